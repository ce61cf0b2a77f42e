"""Application settings: the ``args`` of the Serve application in the Serve YAML.

Deployment sizing (replicas, CPUs/GPUs, autoscaling, ``max_ongoing_requests``) is *not* here: it
lives in the YAML's ``deployments`` section, where Ray Serve applies it. This model holds what the
Python code needs to know: which weights, which limits, how long sessions live.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from atelier3d.editing import EditSettings
from atelier3d.meshing import MeshSettings
from atelier3d.models.sam import default_cache_dir


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
    redis_prefix: str = Field("atelier3d", min_length=1, description="of every key written")
    lock_timeout_s: float = Field(
        10.0, gt=0, description="a session's Redis lock expires after this (a dead holder)"
    )


class JobKindSettings(_Strict):
    max_running: int = Field(
        1, gt=0, description="jobs of this kind dispatched to the model at once: the replicas' "
        "total max_ongoing_requests; the rest wait in the Gateway's queue, in order"
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
