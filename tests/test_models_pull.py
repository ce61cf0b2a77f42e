"""``atelier3d models pull`` against a local hub serving the tiny checkpoints in the official
repos' layouts: what it fetches (only what the loaders read), that the real loaders then work
with ``HF_HUB_OFFLINE=1`` and no other network, and that an interrupted pull resumes to the same
bytes. Every pull and load runs as its own process, as an operator runs them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import yaml
from playwright.sync_api import sync_playwright

from atelier3d.config import AppConfig
from atelier3d.models.edit import qwen_image_edit as qwen_edit
from atelier3d.models.mesh import hunyuan3d
from atelier3d.models.parse import pose
from atelier3d.models.parse import segformer as parsing
from atelier3d.models.pull import download_status, human_bytes, pull_for_serving
from atelier3d.models.segment.sam import TINY_NAME
from atelier3d.pull_status import PullFailed, downloading_message, read_status, wait_for_weights
from atelier3d.serve.runner import load_serve_config
from tests.helpers import assert_error, free_port
from tests.hub_server import HubServer, Repo

ROOT = Path(__file__).resolve().parents[1]
SEGFORMER = parsing.HUB_ID
EDIT = "Qwen/Qwen-Image-Edit"
PLUS = "Qwen/Qwen-Image-Edit-2509"
MESH, MESH_FOLDER = "tencent/Hunyuan3D-2mini", "hunyuan3d-dit-v2-mini"
LORA = "lightx2v/Qwen-Image-Lightning"
LORA_FILE = "Qwen-Image-Edit-Lightning-8steps-V1.0-bf16.safetensors"
PLUS_LORA_FILE = "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors"
MEDIAPIPE_WHEEL = "mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl"
CARD = {"README.md": b"---\nlicense: apache-2.0\n---\n# model card\n",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}


def _junk(n: int, seed: int) -> bytes:
    """Bytes of files no loader reads (other weight formats, other models of the repo)."""
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32)


def _tree(root: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _mediapipe_wheel(tiny_dir: Path) -> bytes:
    """A wheel with the real BlazePose models where mediapipe 0.10.21's has them."""
    models = pose.extracted_dir(pose.POSE_SOURCE, tiny_dir)
    info = "mediapipe-0.10.21.dist-info"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, member in pose.WHEEL_MEMBERS.items():
            wheel.writestr(member, (models / name).read_bytes())
        wheel.writestr(f"{info}/METADATA",
                       "Metadata-Version: 2.1\nName: mediapipe\nVersion: 0.10.21\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n"
                       "Tag: cp311-cp311-manylinux_2_28_x86_64\n")
        wheel.writestr(f"{info}/RECORD", "")
    return buffer.getvalue()


def _sam_name(data: bytes) -> str:
    # Named as Meta names its files: the md5's first hex digits last.
    return f"sam_vit_tiny_{hashlib.md5(data).hexdigest()[:6]}.pth"


@pytest.fixture(scope="module")
def hub(tiny_dir) -> HubServer:
    """The official repos, holding the tiny checkpoints where the real ones hold theirs, and
    files no loader reads beside them."""
    sam = (tiny_dir / "sam" / TINY_NAME).read_bytes()
    shape = hunyuan3d.tiny_shape3d_dir(tiny_dir) / hunyuan3d.TINY_SUBFOLDER
    mesh_files = {f"{MESH_FOLDER}/{name}": data for name, data in _tree(shape).items()}
    repos = {
        SEGFORMER: Repo(_tree(parsing.tiny_segformer_dir(tiny_dir)) | CARD | {
            "pytorch_model.bin": _junk(400_000, 1), "onnx/model.onnx": _junk(300_000, 2)}),
        EDIT: Repo(_tree(qwen_edit.tiny_edit_dir(tiny_dir)) | CARD),
        PLUS: Repo(_tree(qwen_edit.tiny_edit_dir(tiny_dir, plus=True)) | CARD),
        MESH: Repo(mesh_files | CARD | {
            f"{MESH_FOLDER}/model.fp16.ckpt": _junk(500_000, 3),
            f"{MESH_FOLDER}-turbo/config.yaml": b"model: {}\n",
            f"{MESH_FOLDER}-turbo/model.fp16.safetensors": _junk(200_000, 4),
            "hunyuan3d-vae-v2-mini-turbo/config.yaml": b"vae: {}\n",
            "hunyuan3d-vae-v2-mini-turbo/model.fp16.safetensors": _junk(200_000, 5),
            "hunyuan3d-vae-v2-mini-turbo/model.fp16.ckpt": _junk(200_000, 8)}),
        LORA: Repo(CARD | {LORA_FILE: _junk(100_000, 6), PLUS_LORA_FILE: _junk(100_000, 9),
                           "Qwen-Image-Lightning-4steps-V1.0.safetensors": _junk(100_000, 7)}),
    }
    server = HubServer(repos=repos, files={_sam_name(sam): sam},
                       packages={"mediapipe": {MEDIAPIPE_WHEEL: _mediapipe_wheel(tiny_dir)}})
    server.start()
    yield server
    server.stop()


# What the loaders read, hence all a pull may fetch from each repo.
LOADED = {
    SEGFORMER: {"config.json", "model.safetensors", "preprocessor_config.json"},
    MESH: {f"{MESH_FOLDER}/config.yaml", f"{MESH_FOLDER}/model.fp16.safetensors"},
    LORA: {LORA_FILE, PLUS_LORA_FILE},
}


def _loaded(hub: HubServer, repo: str) -> set[str]:
    if repo == PLUS:  # only its transformer runs, beside edit.model's text encoder and VAE
        return {name for name in hub.repos[repo].files if name.startswith("transformer/")}
    return LOADED.get(repo) or set(hub.repos[repo].files) - set(CARD)


def _config(hub: HubServer, tmp: Path) -> Path:
    """A Serve YAML naming the official models (hub ids), real mode, on the CPU."""
    sam_name = next(iter(hub.files))
    config = load_serve_config(args_override={
        "models": "real",
        "cache_dir": str(tmp / "atelier3d"),
        "sam": {"checkpoint": f"{hub.url}/files/{sam_name}"},
        "parsing": {"segformer": SEGFORMER, "pose": pose.POSE_SOURCE, "device": "cpu"},
        "edit": {"model": EDIT, "plus_model": PLUS, "device": "cpu", "quantization": "none",
                 "text_encoder_quantization": "none",
                 "lightning_lora": {"weights": LORA, "weight_name": LORA_FILE}},
        "mesh": {"model": MESH, "subfolder": MESH_FOLDER, "device": "cpu", "flashvdm": False,
                 "texture": "project"},
    })
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _app_config(config_path: Path) -> AppConfig:
    return AppConfig.model_validate(yaml.safe_load(config_path.read_text())
                                    ["applications"][0]["args"])


def _env(tmp: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "PIP_")) and k != "TRANSFORMERS_OFFLINE"}
    return env | {
        "HF_HOME": str(tmp / "hf"), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HY3DGEN_MODELS": str(tmp / "hy3dgen"),  # hy3dgen looks there before the hub cache
        "PIP_INDEX_URL": f"{endpoint}/simple", "PIP_CONFIG_FILE": os.devnull,
        "NO_PROXY": "127.0.0.1,localhost", "PYTHONPATH": str(ROOT),
    }


def _pull(config: Path, tmp: Path, hub: HubServer, *extra: str,
          timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "atelier3d", "models", "pull", "--config", str(config), *extra],
        env=_env(tmp, hub.url), capture_output=True, text=True, timeout=timeout, cwd=tmp)


def _start_pull(config: Path, tmp: Path, hub: HubServer) -> subprocess.Popen:
    # One file at a time: the files before the stalled one are whole, those after untouched.
    return subprocess.Popen(
        [sys.executable, "-m", "atelier3d", "models", "pull", "--config", str(config),
         "--jobs", "1"],
        env=_env(tmp, hub.url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp)


def _cache_files(tmp: Path) -> dict[str, bytes | str]:
    """Every file of both caches (blobs by content, snapshot links by target), less locks and
    the pull's own manifest (it names absolute paths)."""
    out: dict[str, bytes | str] = {}
    for root in (tmp / "hf" / "hub", tmp / "atelier3d"):
        for path in sorted(root.rglob("*")):
            rel = str(path.relative_to(tmp))
            if "/.locks/" in rel or path.name.endswith((".lock", "pull-manifest.json")):
                continue
            if path.is_symlink():
                out[rel] = os.readlink(path)
            elif path.is_file():
                out[rel] = path.read_bytes()
    return out


def _wait(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Pulled(NamedTuple):
    tmp: Path  # HF_HOME is tmp/hf, the atelier3d cache tmp/atelier3d
    config: Path
    done: subprocess.CompletedProcess
    log: list  # the hub's log of the pull


@pytest.fixture(scope="module")
def pulled(hub, tmp_path_factory) -> Pulled:
    """One uninterrupted pull."""
    tmp = tmp_path_factory.mktemp("pull-whole")
    config = _config(hub, tmp)
    before = len(hub.log)
    started = time.perf_counter()
    done = _pull(config, tmp, hub)
    print(f"whole pull: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    return Pulled(tmp, config, done, hub.log[before:])


def test_dry_run_prints_the_files_and_sizes_and_fetches_nothing(hub, tmp_path):
    config = _config(hub, tmp_path)
    before = len(hub.log)
    done = _pull(config, tmp_path, hub, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    for repo in (SEGFORMER, EDIT, MESH, LORA):
        for name in _loaded(hub, repo):
            size = len(hub.repos[repo].files[name])
            assert f"{repo}/{name}  {human_bytes(size)}\n" in done.stdout, name
        for name in set(hub.repos[repo].files) - _loaded(hub, repo):
            assert f"{repo}/{name}" not in done.stdout, f"{name} is not loaded: not fetched"
    sam = next(iter(hub.files.values()))
    loaded = [hub.repos[r].files[n] for r in hub.repos for n in _loaded(hub, r)] + [sam]
    # Files with the same bytes in one repo share a blob (Qwen's two tokenizer.json): one
    # download.
    blobs = {(r, hub.repos[r].files[n]) for r in hub.repos for n in _loaded(hub, r)}
    to_download = sum(len(data) for _, data in blobs) + len(sam)
    total_line = done.stdout.strip().splitlines()[-1]
    assert total_line.startswith(
        f"total: {human_bytes(sum(map(len, loaded)))} in {len(loaded)} files, "
        f"{human_bytes(to_download)} to download"), total_line
    assert to_download < sum(map(len, loaded))
    assert "mediapipe==0.10.21 wheel through pip" in total_line
    # Only the hub's metadata and a HEAD of the SAM file: no body was fetched, nothing written.
    seen = hub.log[before:]
    assert {t.method for t in seen if not t.path.startswith("/api/")} == {"HEAD"}
    assert not (tmp_path / "hf").exists() and not (tmp_path / "atelier3d").exists()


def test_flashvdm_adds_the_turbo_vae_its_loader_reads(hub, tmp_path):
    config = _config(hub, tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["applications"][0]["args"]["mesh"]["flashvdm"] = True
    config.write_text(yaml.safe_dump(raw))
    done = _pull(config, tmp_path, hub, "--dry-run")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines()
              if line.startswith(f"    {MESH}/")}
    assert listed == {f"{MESH}/{name}" for name in (
        f"{MESH_FOLDER}/config.yaml", f"{MESH_FOLDER}/model.fp16.safetensors",
        "hunyuan3d-vae-v2-mini-turbo/config.yaml",
        "hunyuan3d-vae-v2-mini-turbo/model.fp16.safetensors")}


def test_what_cannot_be_fetched_is_a_clear_error(hub, tmp_path):
    config = _config(hub, tmp_path)
    raw = yaml.safe_load(config.read_text())
    args = raw["applications"][0]["args"]
    args["mesh"]["subfolder"] = "hunyuan3d-dit-v9"
    config.write_text(yaml.safe_dump(raw))
    done = _pull(config, tmp_path, hub, "--dry-run")
    assert done.returncode == 1
    assert (f"Hunyuan3D shape: {MESH}@main has no hunyuan3d-dit-v9/config.yaml, "
            "hunyuan3d-dit-v9/model.fp16.safetensors") in done.stderr
    assert "Traceback" not in done.stderr
    args["edit"]["model"] = "Qwen/Qwen-Image-Edit-2599"
    config.write_text(yaml.safe_dump(raw))
    done = _pull(config, tmp_path, hub, "--dry-run")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"Qwen-Image-Edit: Qwen/Qwen-Image-Edit-2599@main on {hub.url}: " in done.stderr
    hub_gone = subprocess.run(
        [sys.executable, "-m", "atelier3d", "models", "pull", "--config", str(config)],
        env=_env(tmp_path, f"http://127.0.0.1:{free_port()}"), capture_output=True, text=True,
        timeout=120, cwd=tmp_path)
    assert hub_gone.returncode == 1 and "Traceback" not in hub_gone.stderr, hub_gone.stderr
    assert "atelier3d models pull: " in hub_gone.stderr


def test_pull_fetches_only_what_the_loaders_read(hub, pulled):
    tmp, done = pulled.tmp, pulled.done
    gets = {t.path for t in pulled.log if t.method == "GET"}
    fetched = {(path.split("/resolve/")[0][1:], path.split("/resolve/")[1].split("/", 1)[1])
               for path in gets if "/resolve/" in path}  # (repo, file): repos share file names
    hub_cache = tmp / "hf" / "hub"
    for repo_id, repo in hub.repos.items():
        loaded = _loaded(hub, repo_id)
        # Files with the same bytes share a blob: fetched once (Qwen's two tokenizer.json).
        assert {n for r, n in fetched if r == repo_id} <= loaded
        assert {repo.files[n] for r, n in fetched if r == repo_id} == {
            repo.files[n] for n in loaded}
        snapshot = hub_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / repo.commit
        assert {p.relative_to(snapshot).as_posix(): p.read_bytes()
                for p in snapshot.rglob("*") if p.is_file()} == {n: repo.files[n] for n in loaded}
    assert f"/packages/{MEDIAPIPE_WHEEL}" in gets and f"/files/{next(iter(hub.files))}" in gets
    # A progress bar per file, after the plan and its total.
    assert done.stdout.index("total: ") < done.stdout.index("pulled: ")
    for repo in (SEGFORMER, MESH):
        for name in _loaded(hub, repo):
            assert f"{repo}/{name}: 100%" in done.stderr, name
    # The cache is huggingface_hub's: refs/main names the commit, snapshots link to blobs.
    storage = hub_cache / "models--tencent--Hunyuan3D-2mini"
    commit = hub.repos[MESH].commit
    assert (storage / "refs" / "main").read_text() == commit
    weights = storage / "snapshots" / commit / MESH_FOLDER / "model.fp16.safetensors"
    assert weights.is_symlink()
    assert weights.read_bytes() == hub.repos[MESH].files[f"{MESH_FOLDER}/model.fp16.safetensors"]
    # huggingface_hub itself, online, finds the pulled blobs where it would have put them: it
    # asks for the etag (HEAD) and fetches nothing.
    before = len(hub.log)
    code = ("from huggingface_hub import hf_hub_download as get; "
            f"print(get({SEGFORMER!r}, 'model.safetensors')); "
            f"print(get({EDIT!r}, 'vae/config.json'))")
    online = subprocess.run([sys.executable, "-c", code], env=_env(tmp, hub.url),
                            capture_output=True, text=True, timeout=120)
    assert online.returncode == 0, online.stderr
    assert online.stdout.split() == [
        str(hub_cache / f"models--{repo.replace('/', '--')}" / "snapshots"
            / hub.repos[repo].commit / name)
        for repo, name in ((SEGFORMER, "model.safetensors"), (EDIT, "vae/config.json"))]
    assert {t.method for t in hub.log[before:]} == {"HEAD"}
    # What the Gateway can ask, without network: every configured model is complete.
    status = {s.key: s for s in download_status(_app_config(pulled.config))}
    assert set(status) == {"sam", "segformer", "pose", "edit", "edit_plus", "lightning_lora",
                           "mesh"}
    assert all(s.state == "complete" and s.fraction == 1.0 for s in status.values()), status


LOAD_OFFLINE = """
import json, sys
from huggingface_hub import hf_hub_download
from atelier3d.config import AppConfig
from atelier3d.models.mesh.hunyuan3d import load_shape_pipeline
from atelier3d.models.parse.segformer import load_parser
from atelier3d.models.parse.pose import load_pose
from atelier3d.models.edit.qwen_image_edit import load_edit_pipeline
from atelier3d.models.segment.sam import resolve_checkpoint

config = AppConfig.model_validate_json(sys.argv[1])
cache = config.cache_path
sam = resolve_checkpoint(config.sam.checkpoint, "real", config.sam.model_type, cache)
sam.build()
parser = load_parser(config.parsing.segformer, "real", cache)
blaze = load_pose(config.parsing.pose, "real", cache)
# The LoRA file is pulled; a tiny LoRA the tiny transformer can load is another change's.
lora = config.edit.lightning_lora
edit = load_edit_pipeline(config.edit.model_copy(update={"lightning_lora": None}), "real", cache)
shape = load_shape_pipeline(config.mesh, "real", cache)
print(json.dumps({
    "sam": [str(sam.path), sam.model_type],
    "parser": [parser.source, parser.trained],
    "pose": blaze.weights.source,
    "edit": [edit.source, edit.trained],
    "lora": hf_hub_download(lora.weights, lora.weight_name),
    "shape": [shape.source, shape.subfolder, str(shape.checkpoint), shape.trained],
}))
"""


def test_the_real_loaders_work_offline_on_the_pulled_cache(hub, pulled):
    tmp, config = pulled.tmp, _app_config(pulled.config)
    before = len(hub.log)
    # Offline, and the hub's address is a closed port: any request would fail loudly.
    env = _env(tmp, f"http://127.0.0.1:{free_port()}", offline=True)
    env["PIP_INDEX_URL"] = env["HF_ENDPOINT"] + "/simple"
    done = subprocess.run([sys.executable, "-c", LOAD_OFFLINE, config.model_dump_json()],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert done.returncode == 0, done.stderr[-4000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    sam_name = next(iter(hub.files))
    assert loaded["sam"] == [str(tmp / "atelier3d" / "sam" / sam_name), "vit_tiny"]
    assert loaded["parser"] == [SEGFORMER, False]  # the tiny model's marker: from our hub
    assert loaded["pose"] == pose.POSE_SOURCE
    assert loaded["edit"] == [EDIT, False]
    assert Path(loaded["lora"]).read_bytes() == hub.repos[LORA].files[LORA_FILE]
    source, subfolder, checkpoint, trained = loaded["shape"]
    assert (source, subfolder, trained) == (MESH, MESH_FOLDER, False)
    assert Path(checkpoint).is_relative_to(tmp / "hf" / "hub")
    assert len(hub.log) == before, "the loaders reached the hub"


def test_an_interrupted_pull_resumes_to_the_same_bytes(hub, pulled, tmp_path):
    config_path = _config(hub, tmp_path)
    config = _app_config(config_path)
    sam_name = next(iter(hub.files))
    sam_size = len(hub.files[sam_name])
    weights = hub.repos[SEGFORMER].files["model.safetensors"]
    lfs = f"/lfs/{hashlib.sha256(weights).hexdigest()}"
    blobs = tmp_path / "hf" / "hub" / "models--mattmdjaga--segformer_b2_clothes" / "blobs"
    cuts = {"sam": (sam_name, 5_000_000, tmp_path / "atelier3d" / "sam" / sam_name),
            "segformer": ("model.safetensors", len(weights) // 3, blobs / lfs[len("/lfs/"):])}

    def state(key: str):
        return next(s for s in download_status(config) if s.key == key)

    def partial_size(path: Path) -> int:
        partial = path.with_name(path.name + ".incomplete")
        return partial.stat().st_size if partial.exists() else -1

    assert {s.state for s in download_status(config)} == {"unknown"}  # nothing planned yet
    received = {}
    for key, (name, cut, path) in cuts.items():
        # The server stops that file's body after `cut` bytes; the pull is killed there.
        hub.stall(name, cut)
        before = len(hub.log)
        proc = _start_pull(config_path, tmp_path, hub)
        try:
            _wait(lambda p=path, n=cut: partial_size(p) == n, what=f"{name} at {cut} bytes")
            progress = state(key)
            assert progress.state == "partial" and 0 < progress.fraction < 1
            assert progress.describe() == (f"{progress.label} ({progress.source}): "
                                           f"{progress.fraction:.0%} of "
                                           f"{human_bytes(progress.total_bytes)}")
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            hub.release()
        received[key] = [t for t in hub.log[before:] if t.method == "GET"]
    before = len(hub.log)
    done = _pull(config_path, tmp_path, hub)
    assert done.returncode == 0, done.stdout + done.stderr
    last = [t for t in hub.log[before:] if t.method == "GET"]

    # SAM: cut at 5 MB in the first run, continued from there in the second.
    sam_gets = [t for t in received["segformer"] if t.path == f"/files/{sam_name}"]
    assert [(t.range_start, t.body_bytes, t.status) for t in sam_gets] == [
        (5_000_000, sam_size - 5_000_000, 206)]
    # SegFormer's weights: cut in the second run, continued in the third (behind the redirect).
    cut = cuts["segformer"][1]
    assert [(t.range_start, t.body_bytes, t.status) for t in last if t.path == lfs] == [
        (cut, len(weights) - cut, 206)]
    # No file was fetched twice from the start.
    starts = [t.path for t in received["sam"] + received["segformer"] + last
              if t.range_start == 0 and not t.path.startswith(("/simple/", "/api/"))
              and t.status == 200]
    assert len(starts) == len(set(starts)), starts
    assert all(s.state == "complete" for s in download_status(config))
    # Byte for byte what the uninterrupted pull wrote.
    whole = _cache_files(pulled.tmp)
    resumed = _cache_files(tmp_path)
    assert resumed.keys() == whole.keys()
    assert all(resumed[k] == whole[k] for k in whole)
    assert not list((tmp_path / "hf").rglob("*.incomplete"))

    # A blob damaged on disk (same size): a pull trusts sizes, a pull --verify re-checks the
    # digests and fetches it again.
    blob = cuts["segformer"][2]
    blob.write_bytes(bytes(len(weights)))
    before = len(hub.log)
    assert _pull(config_path, tmp_path, hub).returncode == 0
    assert not [t for t in hub.log[before:] if t.method == "GET" and t.path == lfs]
    done = _pull(config_path, tmp_path, hub, "--verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "does not match" in done.stderr and "fetching it again" in done.stderr
    assert [t.range_start for t in hub.log[before:] if t.path == lfs] == [0]
    assert blob.read_bytes() == weights


@pytest.mark.cluster
def test_serve_real_starts_offline_on_the_pulled_cache(hub, pulled):
    """``atelier3d serve --models real`` on what was pulled, with HF_HUB_OFFLINE=1 and the hub
    unreachable: every replica loads its weights from the cache and /readyz is green."""
    tmp = pulled.tmp
    raw = yaml.safe_load(pulled.config.read_text())
    args = raw["applications"][0]["args"]
    args["edit"]["lightning_lora"] = None  # the served LoRA is placeholder bytes (see above)
    args["ui"] = False
    config = tmp / "serve-offline.yaml"
    config.write_text(yaml.safe_dump(raw))
    port = free_port()
    env = _env(tmp, f"http://127.0.0.1:{free_port()}", offline=True) | {
        "ATELIER3D_RAY_LOGS": "0"}
    env["PIP_INDEX_URL"] = env["HF_ENDPOINT"] + "/simple"
    before = len(hub.log)
    log = tmp / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "atelier3d", "serve", "--config", str(config),
             "--models", "real", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
    try:
        ready = None
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=15)
                if ready.status_code == 200 and ready.json()["ready"]:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert ready is not None and ready.status_code == 200, log.read_text()[-4000:]
        info = ready.json()
        assert info["ready"] is True and info["weights"] == "untrained", info
        sam = next(iter(hub.files.values()))
        assert info["models"]["sam_encoder"]["checkpoint_sha256"] == hashlib.sha256(
            sam).hexdigest()
        # Printed once every deployment (parser, editor, shape too) runs, its weights loaded:
        # when `serve` sees the application RUNNING, which may come a moment after /readyz.
        deadline = time.monotonic() + 60
        while ("atelier3d is serving the UI and API" not in log.read_text()
               and time.monotonic() < deadline and proc.poll() is None):
            time.sleep(0.5)
        assert "atelier3d is serving the UI and API" in log.read_text(), log.read_text()[-4000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]
    assert len(hub.log) == before, "a replica reached the hub"


def test_the_progress_api_loads_without_torch():
    """The Gateway may ask download_status: importing it must not import torch."""
    check = ("import sys, atelier3d.models.pull; "
             "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", check], env=os.environ | {
        "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.cluster
@pytest.mark.browser
def test_serve_real_pulls_what_is_missing_and_says_how_far(hub, tmp_path):
    """``atelier3d serve --models real`` on an empty cache: it pulls the models itself, with
    progress bars in its log; while the SAM checkpoint is held halfway, /readyz answers 503
    naming it with its percentage and the UI banner says the same; released, the replicas load
    from the cache (offline: not one request of theirs reaches the hub) and /readyz is green."""
    raw = yaml.safe_load(_config(hub, tmp_path).read_text())
    raw["applications"][0]["args"]["edit"]["lightning_lora"] = None  # placeholder bytes (above)
    config = tmp_path / "serve-pull.yaml"
    config.write_text(yaml.safe_dump(raw))
    sam_name, sam = next(iter(hub.files.items()))
    hub.stall(sam_name, len(sam) // 2, keepalive_s=5)  # held halfway, however long the start
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    before = len(hub.log)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "atelier3d", "serve", "--config", str(config),
             "--models", "real", "--port", str(port)],
            env=_env(tmp_path, hub.url) | {"ATELIER3D_RAY_LOGS": "0"}, stdout=out,
            stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)

    def readyz_until(accept, timeout: float) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                reply = httpx.get(f"{url}/readyz", timeout=15)
                if accept(reply):
                    return reply
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)

    try:
        reply = readyz_until(lambda r: "downloading model weights" in r.text, timeout=600)
        message = assert_error(reply, 503, "unavailable")["message"]
        seen = re.search(rf"SAM checkpoint \({re.escape(hub.url)}/files/{sam_name}\): (\d+)% "
                         rf"of {re.escape(human_bytes(len(sam)))}", message)
        assert seen and 0 < int(seen[1]) < 100, message
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                 headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url, timeout=180_000)
            banner = page.locator("#weights-banner")
            banner.wait_for(state="visible", timeout=180_000)
            shown = banner.inner_text()
            assert "downloading model weights" in shown and seen[0] in shown, shown
            hub.release()
            readyz_until(lambda r: r.status_code == 200 and r.json()["ready"], timeout=400)
            # The open page follows: its banner now says the weights are random (tiny ones).
            page.wait_for_function(
                "() => document.querySelector('#weights-banner')?.innerText"
                ".includes('untrained (random) weights')", timeout=180_000)
            browser.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        hub.release()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert f"{sam_name}: 100%" in text and "pulled: " in text, text[-4000:]
    assert text.index("not on disk yet: ") < text.index("total: ") < text.index("pulled: ")
    seen_by_hub = hub.log[before:]
    # Each body came once, from its start, to the pull; the replicas, offline, asked nothing (a
    # hub download asks for the file's etag with a HEAD on /resolve/ first).
    bodies = [t.path for t in seen_by_hub if t.method == "GET"
              and t.path.startswith(("/lfs/", "/files/", "/packages/"))]
    assert len(bodies) == len(set(bodies)), bodies
    assert not [t for t in seen_by_hub if t.method == "HEAD" and "/resolve/" in t.path]
    assert all(s.state == "complete" for s in download_status(_app_config(config)))


def test_replicas_wait_for_the_pull_beside_them_and_hear_of_its_failure(hub, tmp_path):
    """What ``serve`` starts (``pull_for_serving``) and what a model replica does before loading
    (``wait_for_weights``), in this process: the SAM checkpoint is the one model to fetch (the
    others are local paths), held halfway, then damaged."""
    sam_name, sam = next(iter(hub.files.items()))
    local = str(tmp_path)  # a local path: nothing to fetch

    def config(cache: str) -> AppConfig:
        return AppConfig.model_validate({
            "models": "real", "cache_dir": str(tmp_path / cache),
            "sam": {"checkpoint": f"{hub.url}/files/{sam_name}"},
            "parsing": {"segformer": local, "pose": local},
            "edit": {"model": local, "plus_model": None, "lightning_lora": None},
            "mesh": {"model": local}})

    whole = config("whole")
    assert [m.key for m in download_status(whole)] == ["sam"]
    hub.stall(sam_name, len(sam) // 2)
    try:
        log = io.StringIO()
        background = pull_for_serving([whole], log)
        assert background is not None and background.running()
        waiting = threading.Thread(target=wait_for_weights, args=(whole.cache_path, ["sam"]))
        waiting.start()
        _wait(lambda: "50% of" in (downloading_message(whole.cache_path) or ""),
              what="the status at the held byte")
        message = downloading_message(whole.cache_path)
        assert message == (f"downloading model weights: SAM checkpoint ({hub.url}/files/"
                           f"{sam_name}): 50% of {human_bytes(len(sam))}. The models start once "
                           "their weights are on disk."), message
        assert waiting.is_alive()
        wait_for_weights(whole.cache_path, ["segformer"])  # not this pull's: no wait
        hub.release()
        waiting.join(60)
        assert not waiting.is_alive() and not background.running()
        assert read_status(whole.cache_path).state == "done"
        assert downloading_message(whole.cache_path) is None
        assert "not on disk yet: SAM checkpoint" in log.getvalue() and "pulled: " in log.getvalue()
        # Everything on disk: serve pulls nothing, and forgets the last pull's status.
        assert pull_for_serving([whole], log) is None and read_status(whole.cache_path) is None

        # Other bytes of the same size: the digest in the file's name does not match; the pull
        # fails and the replica waiting for SAM hears why, instead of loading or waiting on.
        damaged = config("damaged")
        hub.files[sam_name] = bytes(len(sam))
        background = pull_for_serving([damaged], log)
        with pytest.raises(PullFailed, match=rf"the weights of SAM checkpoint could not be "
                           rf"pulled: {sam_name}: digest \w+ does not match"):
            wait_for_weights(damaged.cache_path, ["sam"])
        assert read_status(damaged.cache_path).state == "failed"
    finally:
        hub.files[sam_name] = sam
        hub.release()
