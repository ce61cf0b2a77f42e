"""Application settings: the ``args`` of the Serve application in the Serve YAML.

Deployment sizing (replicas, CPUs/GPUs, autoscaling, ``max_ongoing_requests``) is *not* here: it
lives in the YAML's ``deployments`` section, where Ray Serve applies it. This model holds what the
Python code needs to know: which weights, which limits, how long sessions live.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelsMode = Literal["auto", "tiny", "real"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ATELIER3D_HOME", Path.home() / ".cache" / "atelier3d"))


Quantization = Literal["auto", "bitsandbytes_4bit", "bitsandbytes_8bit", "torchao_int8wo", "none"]

# The pipelines work on 2x2 patches of 8x-downsampled latents: sizes are multiples of 16.
SIZE_MULTIPLE = 16

# Qwen-Image-Edit releases trained for several input images (the Plus pipeline); the first one,
# Qwen/Qwen-Image-Edit, was trained on one.
MULTI_IMAGE_RELEASES = ("2509", "2511")


class LightningLora(BaseModel):
    """Qwen-Image-Lightning: a step-distillation LoRA (4 or 8 steps, no CFG)."""

    model_config = ConfigDict(extra="forbid")

    weights: str = Field(
        "lightx2v/Qwen-Image-Lightning", description="hub id or local directory of the LoRA"
    )
    weight_name: str = Field(
        "Qwen-Image-Edit-Lightning-8steps-V1.0-bf16.safetensors",
        description="file in it for edit.model; match the base model (Qwen-Image-Edit-2509/... "
        "when edit.model is Qwen-Image-Edit-2509)",
    )
    plus_weight_name: str = Field(
        "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors",
        description="file in it for edit.plus_model's transformer (when that is set)",
    )
    steps: Literal[4, 8] = Field(8, description="the step count the LoRA was distilled for")


class FirstBlockCache(BaseModel):
    """diffusers' First-Block Cache: a step reuses the other blocks' residual while the first
    block's output changed by less than ``threshold`` (relative L1) since it last ran them."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["first_block"] = "first_block"
    threshold: float = Field(0.05, ge=0, le=1)


class MagCache(BaseModel):
    """diffusers' MagCache: skips steps by the magnitude ratios of the model's residuals, which
    must be calibrated for the weights served (``mag_ratios``, interpolated to each edit's
    step count)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["mag"] = "mag"
    mag_ratios: list[float] = Field(min_length=2)
    threshold: float = Field(0.06, ge=0)
    max_skip_steps: int = Field(3, ge=1)
    retention_ratio: float = Field(0.2, ge=0, le=1)


class TaylorSeerCache(BaseModel):
    """diffusers' TaylorSeer: runs the blocks every ``cache_interval`` steps and predicts the
    steps between from a Taylor expansion of their outputs."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["taylorseer"] = "taylorseer"
    cache_interval: int = Field(5, ge=1)
    disable_cache_before_step: int = Field(3, ge=0)
    max_order: int = Field(1, ge=0, le=4)


EditCache = Annotated[FirstBlockCache | MagCache | TaylorSeerCache, Field(discriminator="kind")]


class EditSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "Qwen/Qwen-Image-Edit",
        description="hub id (Qwen/Qwen-Image-Edit, Qwen/Qwen-Image-Edit-2509) or local directory",
    )
    quantization: Quantization = Field(
        "auto", description="the transformer's weights; auto: bitsandbytes_4bit (nf4) on CUDA, "
        "none on CPU (bitsandbytes needs a GPU; torchao_int8wo runs on CPU too)"
    )
    text_encoder_quantization: Quantization = Field(
        "auto", description="the Qwen2.5-VL text encoder's weights (its vision tower and lm_head "
        "stay unquantized with bitsandbytes)"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    plus_model: str | None = Field(
        None, description="weights trained for multi-image edits (extra_sources), hub id "
        "(Qwen/Qwen-Image-Edit-2509) or local directory: its transformer runs the Plus pipeline "
        "beside edit.model's text encoder and VAE (the same in both releases). Unset: multi-image "
        "edits run on edit.model when that was trained for them (2509/2511), else are refused "
        "(422)"
    )
    plus: bool | None = Field(
        None, description="run single-image edits with the Plus pipeline too, as "
        "Qwen-Image-Edit-2509 expects; default: when the model's name contains 2509 or 2511"
    )
    lightning_lora: LightningLora | None = None
    cache: EditCache | None = Field(
        None, description="a step cache of the transformer (first_block, mag, taylorseer); "
        "unset: every step runs every block (the measured default, benchmarks/edit_cache.py)"
    )
    steps: int | None = Field(
        None, ge=1, description="default steps; unset: 50, or the Lightning LoRA's 4/8"
    )
    true_cfg_scale: float | None = Field(
        None, ge=1, le=20, description="default; unset: 4.0, or 1.0 (no CFG) with Lightning"
    )
    max_steps: int = Field(100, ge=1)
    min_side: int = Field(256, ge=SIZE_MULTIPLE, description="smallest output width/height")
    max_side: int = Field(2048, ge=SIZE_MULTIPLE, description="largest output width/height")

    @property
    def default_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return self.lightning_lora.steps if self.lightning_lora else 50

    @property
    def default_true_cfg_scale(self) -> float:
        if self.true_cfg_scale is not None:
            return self.true_cfg_scale
        return 1.0 if self.lightning_lora else 4.0

    @property
    def model_is_multi_image(self) -> bool:
        return any(release in self.model for release in MULTI_IMAGE_RELEASES)

    @property
    def plus_for_single_image(self) -> bool:
        return self.plus if self.plus is not None else self.model_is_multi_image

    @property
    def multi_image_model(self) -> str | None:
        """The weights the Plus pipeline runs on: ``plus_model``, else ``model`` when it was
        trained for multi-image edits; None: multi-image edits are refused."""
        if self.plus_model is not None:
            return self.plus_model
        return self.model if self.model_is_multi_image else None

    @model_validator(mode="after")
    def _check(self) -> EditSettings:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} > max_side {self.max_side}")
        if self.steps is not None and self.steps > self.max_steps:
            raise ValueError(f"steps {self.steps} > max_steps {self.max_steps}")
        if self.plus and self.multi_image_model is None:
            raise ValueError(f"plus: true runs every edit with the Plus pipeline, and {self.model}"
                             " was not trained for it: set plus_model (Qwen/Qwen-Image-Edit-2509)")
        return self


PostprocessMethod = Literal["fast", "pymeshlab"]
OCTREE_RANGE = (16, 1024)
FACE_RANGE = (500, 2_000_000)


class MeshSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "tencent/Hunyuan3D-2mini",
        description="hub id (tencent/Hunyuan3D-2, tencent/Hunyuan3D-2mini) or a local directory "
        "in the same layout (<dir>/<subfolder>/config.yaml + model.fp16.safetensors)",
    )
    subfolder: str = Field(
        "hunyuan3d-dit-v2-mini",
        description="the shape model inside it: hunyuan3d-dit-v2-0, hunyuan3d-dit-v2-0-turbo, "
        "hunyuan3d-dit-v2-mini, hunyuan3d-dit-v2-mini-turbo, ...",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto: float16 on CUDA (as the weights are published), float32 on CPU"
    )
    flashvdm: bool = Field(
        False, description="FlashVDM volume decoding (hierarchical, adaptive KV; uses the turbo "
        "VAE where the model folder has one): its authors report it much faster at octree 256+; "
        "on an H200 with random weights it was 10x slower than dense (benchmarks/README.md)"
    )
    texture: Literal["auto", "paint", "project", "none"] = Field(
        "auto", description="paint: Hunyuan3D-Paint on mesh.device (a torch rasterizer stands "
        "in for hy3dgen's compiled custom_rasterizer where it is missing); project: colours "
        "projected from the input view; auto: paint on CUDA, else project (saying why)"
    )
    paint_model: str = Field(
        "tencent/Hunyuan3D-2", description="hub id or local directory with "
        "hunyuan3d-paint-v2-0 and hunyuan3d-delight-v2-0"
    )
    steps: int = Field(30, ge=1, le=200, description="default diffusion steps")
    guidance_scale: float = Field(5.0, ge=0, le=30, allow_inf_nan=False)
    octree_resolution: int = Field(256, ge=OCTREE_RANGE[0], le=OCTREE_RANGE[1])
    max_octree_resolution: int = Field(
        512, ge=OCTREE_RANGE[0], le=OCTREE_RANGE[1],
        description="requests above this are refused (volume decoding memory grows as its cube)",
    )
    num_chunks: int = Field(8000, ge=1000, description="query points per volume decoding batch")
    target_face_count: int = Field(40000, ge=FACE_RANGE[0], le=FACE_RANGE[1])
    mc_level: float = Field(0.0, allow_inf_nan=False, description="iso-level of the surface")
    postprocess: PostprocessMethod = Field(
        "fast", description="mesh clean-up (floaters, degenerate faces, decimation to "
        "target_face_count): fast (numpy/scipy and fast-simplification) or pymeshlab (hy3dgen's "
        "own filters, the reference: about 10x the CPU time at 1.2 M faces, "
        "benchmarks/results/mesh_postprocess.json)"
    )
    stages: Literal["split", "single"] = Field(
        "split", description="split: a job's accelerator half (denoising to surface extraction) "
        "runs on Shape3D and its CPU half (clean-up, texture projection, GLB export) on "
        "MeshFinish, so Shape3D starts the next job meanwhile; single: the whole job on Shape3D"
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamSettings(_Strict):
    checkpoint: str = Field("vit_b", description="local .pth path, URL, or vit_b / vit_l / vit_h")
    model_type: str | None = Field(None, description="architecture; inferred from the file name")
    decoder_int8: bool = Field(False, description="dynamic int8 quantisation of the ONNX decoder")
    onnx_providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime providers in order of preference; unavailable ones are skipped",
    )
    encoder_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU"
    )
    encode_timeout_s: float = Field(300.0, gt=0)


class ParsingSettings(_Strict):
    segformer: str = Field(
        "mattmdjaga/segformer_b2_clothes",
        description="SegFormer with the 18 ATR labels: hub id or local save_pretrained directory",
    )
    pose: str = Field(
        "mediapipe==0.10.21",
        description="BlazePose models: mediapipe==X.Y.Z (its PyPI wheel, downloaded once), a local "
        "mediapipe .whl, or a directory with pose_detection.tflite + pose_landmark_*.tflite",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="SegFormer's device")


class Limits(_Strict):
    max_upload_bytes: int = Field(25 * 2**20, gt=0)
    max_json_bytes: int = Field(4 * 2**20, gt=0)
    max_pixels: int = Field(36_000_000, gt=0, description="decompression-bomb guard")
    max_aspect_ratio: float = Field(
        1000.0, gt=1, le=2048, description="longest side / shortest side of an upload; beyond "
        "2048 a side of SAM's 1024-pixel frame is zero pixels wide")
    max_points: int = Field(64, gt=0)
    max_sessions_per_client: int = Field(32, gt=0)


class SessionSettings(_Strict):
    ttl_s: float = Field(3600.0, gt=0, description="idle time after which a session expires")
    max_sessions: int = Field(512, gt=0, description="least recently used sessions go first")
    max_resident_embeddings: int = Field(
        128, gt=0, description="embeddings kept in the object store; others are recomputed"
    )
    max_history: int = Field(64, gt=0, description="undo steps kept per object")
    max_parses: int = Field(
        4, gt=0, description="body/garment parses kept per session; the oldest goes first"
    )
    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: in each Gateway replica (a client must stay on one: "
        "sticky routing); redis: shared, so any Gateway replica serves any session"
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="with backend: redis")
    redis_password_env: str | None = Field(
        None, description="name of an environment variable of the Gateway's replica holding "
        "the Redis password (e.g. from a Kubernetes Secret), to keep it out of redis_url")
    redis_prefix: str = Field("atelier3d", min_length=1, description="of every key written")
    lock_timeout_s: float = Field(
        10.0, gt=0, description="a session's Redis lock expires after this (a dead holder)"
    )


class JobKindSettings(_Strict):
    max_running: int = Field(
        1, gt=0, description="jobs of this kind dispatched to the model at once, per Gateway "
        "replica: at most the model replicas' total max_ongoing_requests (checked when the Serve "
        "config is deployed); the rest wait in the Gateway's queue, in order"
    )
    max_queued: int = Field(32, ge=0, description="beyond this, submissions get 503 + Retry-After")


class JobSettings(_Strict):
    edit: JobKindSettings = Field(default_factory=JobKindSettings)
    mesh: JobKindSettings = Field(default_factory=JobKindSettings)
    max_jobs_per_session: int = Field(
        32, gt=0, description="finished jobs (and their results) kept per session; oldest go first"
    )
    ttl_s: float = Field(
        3600.0, gt=0, description="how long a job without a session (an uploaded image) is kept"
    )
    max_attempts: int = Field(
        2, ge=1, description="a job whose replica is lost (killed, crashed, node gone) runs "
        "again from the start, up to this many runs in all; then it fails as retryable"
    )
    lease_s: float = Field(
        10.0, gt=0, description="with Redis sessions: a job's lease, renewed by the Gateway "
        "replica that runs it; when it lapses (that replica died), the job fails as retryable"
    )
    drain_s: float = Field(
        600.0, ge=0, description="a Gateway replica being stopped (scale-down, upgrade) lets "
        "its queued and running jobs finish for this long, then fails the rest as retryable; "
        "keep it below the Gateway's graceful_shutdown_timeout_s"
    )


class RateLimit(_Strict):
    """A token bucket: ``per_s`` sustained, up to ``burst`` at once."""

    per_s: float = Field(gt=0)
    burst: int = Field(gt=0)


class FairUseSettings(_Strict):
    """Per-client limits on ``/v1`` (429 + Retry-After); the UI is paced by Gradio's queue."""

    trust_forwarded_for: bool = Field(
        False, description="the client is the first X-Forwarded-For address: only behind a "
        "proxy (the k8s ingress) that sets it; otherwise anyone could pick their own bucket"
    )
    exempt: list[str] = Field(
        default_factory=list, description="addresses or CIDRs never limited (load generators, "
        "internal services)"
    )
    uploads: RateLimit | None = Field(RateLimit(per_s=0.5, burst=10),
                                      description="POST /v1/sessions")
    clicks: RateLimit | None = Field(
        RateLimit(per_s=20, burst=40),
        description="segment, cutout, object edits: what a person clicking produces, with room",
    )
    parses: RateLimit | None = Field(RateLimit(per_s=0.5, burst=5), description="POST .../parse")
    jobs: RateLimit | None = Field(RateLimit(per_s=0.5, burst=10),
                                   description="POST /v1/jobs/edit and /v1/jobs/mesh")
    reads: RateLimit | None = Field(RateLimit(per_s=50, burst=200),
                                    description="every other /v1 request (status, results)")
    max_active_jobs: int | None = Field(
        4, gt=0, description="edit + mesh jobs a client may have queued or running at once"
    )


class AuthSettings(_Strict):
    """Who may use the server. Empty (the default): nobody needs a key, and a session or job id
    is the capability to use it. With API keys, every ``/v1`` route needs
    ``Authorization: Bearer <key>`` (401 without), and what one key creates (sessions, their
    objects and parses, jobs) is invisible to every other key (404, as if it did not exist).
    ``/healthz``, ``/readyz``, ``/docs`` and the metrics port stay open."""

    api_keys: list[str] = Field(
        default_factory=list, description="accepted keys: each the key itself (16+ characters) "
        "or, to keep keys out of config files, 'sha256:' and the hex SHA-256 of the key")
    api_keys_file: str | None = Field(
        None, description="a file (absolute path on the Gateway's node) with one key or "
        "sha256:<hex> per line; blank lines and # comments are skipped")
    api_keys_env: str | None = Field(
        None, description="name of an environment variable of the Gateway's replica holding "
        "keys (or sha256:<hex>), comma-separated; e.g. set through the YAML's runtime_env")
    ui_users: dict[str, str] = Field(
        default_factory=dict, description="Gradio login for the UI: user name -> password, or "
        "'sha256:' and the hex SHA-256 of the password. Empty: the UI is open to everyone")


class AppConfig(_Strict):
    models: Literal["auto", "tiny", "real"] = "auto"
    cache_dir: str | None = Field(None, description="weights and ONNX cache; $ATELIER3D_HOME")
    sam: SamSettings = Field(default_factory=SamSettings)
    parsing: ParsingSettings = Field(default_factory=ParsingSettings)
    limits: Limits = Field(default_factory=Limits)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    edit: EditSettings = Field(default_factory=EditSettings)
    mesh: MeshSettings = Field(default_factory=MeshSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    fair_use: FairUseSettings = Field(default_factory=FairUseSettings)
    ui: bool = Field(True, description="mount the Gradio UI at /")
    auth: AuthSettings = Field(default_factory=AuthSettings)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
