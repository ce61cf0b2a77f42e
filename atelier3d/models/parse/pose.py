"""Body keypoints from Google's BlazePose (the models mediapipe 0.10.21 ships), run with LiteRT.

mediapipe itself cannot live in this environment (it pins numpy<2 and protobuf<5, and crashes with
protobuf 7), so its two TFLite models are taken out of its PyPI wheel and run with
``ai-edge-litert`` (numpy 2). The pipeline is mediapipe's own "pose landmark" graph, re-done in
numpy/OpenCV and checked against mediapipe's output on the astronaut photo (same ROI to 4
decimals, keypoints within a pixel where confident):

1. BlazePose detector (224x224, [-1, 1], letterboxed with zeros) on the person's box; weighted
   non-max suppression; its hip-centre and body-circle keypoints give a rotated square ROI (x1.25).
2. Landmark model (256x256, [0, 1], *replicated* border) on that ROI: 33 keypoints + 2 auxiliary
   ones, visibility/presence logits, and a 64x64 heatmap that refines each confident keypoint.

There is no tiny variant: the real models are 9 MB from a package registry and run in ~20 ms. When
they cannot be had, ``load_pose`` returns ``None`` (loudly) in ``auto``/``tiny`` mode, so the rest
of the pipeline runs without keypoints.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import subprocess
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from atelier3d.api.parse import KEYPOINT_NAMES, Keypoint, Pose
from atelier3d.config import ModelsMode, default_cache_dir
from atelier3d.models.loading import file_sha256, load_or_tiny

logger = logging.getLogger(__name__)

POSE_SOURCE = "mediapipe==0.10.21"

DETECTOR_FILE = "pose_detection.tflite"

# All three variants share inputs and outputs; a directory may hold any of them.
LANDMARK_FILES = ("pose_landmark_heavy.tflite", "pose_landmark_full.tflite",
                  "pose_landmark_lite.tflite")

WHEEL_MEMBERS = {
    DETECTOR_FILE: "mediapipe/modules/pose_detection/pose_detection.tflite",
    "pose_landmark_full.tflite": "mediapipe/modules/pose_landmark/pose_landmark_full.tflite",
}

# Digests of the files in mediapipe 0.10.21, checked after extraction.
KNOWN_SHA256 = {
    DETECTOR_FILE: "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c",
    "pose_landmark_full.tflite": "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f",
}

# The models are the same in every platform's wheel; naming one lets any interpreter fetch it
# (0.10.21 has no wheels for Python >= 3.13).
WHEEL_PLATFORM = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                  "--implementation", "cp", "--abi", "cp311"]

DETECTOR_SIZE = 224

LANDMARK_SIZE = 256

HEATMAP_KERNEL = 7

MIN_DETECTION_SCORE = 0.5

NMS_IOU = 0.3

ROI_SCALE = 1.25


class Roi(NamedTuple):
    """A rotated square in image pixels; rotation is clockwise (y points down), radians."""

    cx: float
    cy: float
    size: float
    rotation: float

    def matrix(self, tensor_size: int) -> np.ndarray:
        """2x3 affine taking tensor pixel coordinates to image coordinates."""
        c, s = math.cos(self.rotation), math.sin(self.rotation)
        k = self.size / tensor_size
        half = tensor_size / 2
        return np.array([
            [c * k, -s * k, self.cx - k * (c * half - s * half)],
            [s * k, c * k, self.cy - k * (s * half + c * half)],
        ])


@dataclass(frozen=True)
class PoseWeights:
    detector: Path
    landmarks: Path
    source: str

    @property
    def variant(self) -> str:
        return "blazepose-" + self.landmarks.stem.rsplit("_", 1)[-1]

    @functools.cached_property
    def sha256(self) -> str:
        both = file_sha256(self.detector) + file_sha256(self.landmarks)
        return hashlib.sha256(both.encode()).hexdigest()


def _from_dir(directory: Path, source: str) -> PoseWeights:
    detector = directory / DETECTOR_FILE
    landmarks = next((directory / f for f in LANDMARK_FILES if (directory / f).is_file()), None)
    if not detector.is_file() or landmarks is None:
        raise FileNotFoundError(f"{directory} lacks {DETECTOR_FILE} or a pose_landmark_*.tflite")
    return PoseWeights(detector=detector, landmarks=landmarks, source=source)


def extract_from_wheel(wheel: Path, dest: Path) -> PoseWeights:
    """Copies the two pose models out of a mediapipe wheel into ``dest`` (atomically)."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        missing = set(WHEEL_MEMBERS.values()) - set(archive.namelist())
        if missing:  # releases after 0.10.21 ship no models in the wheel
            raise FileNotFoundError(f"{wheel.name} has no {', '.join(sorted(missing))}")
        for name, member in WHEEL_MEMBERS.items():
            tmp = dest / f"{name}.part{os.getpid()}"
            tmp.write_bytes(archive.read(member))
            expected = KNOWN_SHA256.get(name)
            if "0.10.21" in wheel.name and expected and file_sha256(tmp) != expected:
                tmp.unlink()
                raise ValueError(f"{member} in {wheel.name} does not have the known digest")
            os.replace(tmp, dest / name)
    return _from_dir(dest, str(wheel))


def download_wheel(spec: str, dest: Path, timeout_s: float = 300.0) -> Path:
    """``pip download --no-deps`` of a mediapipe wheel (~35 MB) into ``dest``; never installed."""
    dest.mkdir(parents=True, exist_ok=True)
    logger.info("downloading the %s wheel for its pose models -> %s", spec, dest)
    cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--only-binary=:all:",
           *WHEEL_PLATFORM, "--quiet", "--disable-pip-version-check", "-d", str(dest),
           # Fail fast offline instead of pip's default retries (minutes).
           "--retries", "1", "--timeout", "30"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    wheels = sorted(dest.glob("mediapipe-*.whl"))
    if done.returncode != 0 or not wheels:
        raise OSError(f"pip download {spec} failed: {done.stderr.strip()[-500:]}")
    return wheels[-1]


def extracted_dir(source: str, cache_dir: Path | None = None) -> Path:
    """Where the models of a ``mediapipe==X.Y.Z`` wheel are kept once extracted."""
    return (cache_dir or default_cache_dir()) / "pose" / source.replace("==", "-")


def resolve_pose_weights(source: str = POSE_SOURCE, cache_dir: Path | None = None) -> PoseWeights:
    """Finds the pose models named by ``source``.

    ``source`` is a directory holding ``pose_detection.tflite`` and a ``pose_landmark_*.tflite``,
    a local mediapipe ``.whl``, or a requirement such as ``mediapipe==0.10.21`` whose wheel is
    downloaded once; what is extracted goes to ``<cache>/pose/<name>`` (never to the repository).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_dir(path, source)
    cache = (cache_dir or default_cache_dir()) / "pose"
    if path.suffix == ".whl":
        if not path.is_file():
            raise FileNotFoundError(f"pose wheel {path} does not exist")
        return extract_from_wheel(path, cache / path.name.split("-py")[0].split("-cp")[0])
    if not source.startswith("mediapipe=="):
        raise ValueError(f"pose source {source!r}: give a directory, a .whl or mediapipe==X.Y.Z")
    dest = extracted_dir(source, cache_dir)
    try:
        return _from_dir(dest, source)
    except FileNotFoundError:
        pass
    wheels = sorted((cache / "wheels").glob(f"{source.replace('==', '-')}-*.whl"))
    if wheels:  # put there by hand (an offline machine): kept
        extract_from_wheel(wheels[-1], dest)
    else:  # only the 9 MB of models are kept, not the 35 MB wheel
        wheel = download_wheel(source, cache / "wheels")
        try:
            extract_from_wheel(wheel, dest)
        finally:
            wheel.unlink(missing_ok=True)
    return _from_dir(dest, source)


@functools.cache
def _anchors() -> np.ndarray:
    """Anchor centres of the BlazePose detector (mediapipe SsdAnchorsCalculator options):
    strides 8, 16, 32, 32, 32; two anchors per layer and cell; layers of one stride share a grid."""
    centres = []
    for stride, layers in ((8, 1), (16, 1), (32, 3)):
        grid = math.ceil(DETECTOR_SIZE / stride)
        ys, xs = np.mgrid[0:grid, 0:grid]
        cell = np.stack([(xs + 0.5) / grid, (ys + 0.5) / grid], -1).reshape(-1, 1, 2)
        centres.append(np.repeat(cell, 2 * layers, axis=1).reshape(-1, 2))
    return np.concatenate(centres).astype(np.float32)  # (2254, 2), normalised


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum((box[2] - box[0]) * (box[3] - box[1]) + areas - inter, 1e-9)


def _roi_from_points(center: np.ndarray, scale_point: np.ndarray) -> Roi:
    """mediapipe's AlignmentPointsRects (target 90 deg) + RectTransformation (x1.25, square)."""
    dx, dy = scale_point - center
    rotation = math.pi / 2 - math.atan2(-dy, dx)
    rotation -= 2 * math.pi * math.floor((rotation + math.pi) / (2 * math.pi))
    size = 2 * math.hypot(dx, dy) * ROI_SCALE
    return Roi(float(center[0]), float(center[1]), size, rotation)


def _refine_from_heatmap(uv: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """mediapipe's RefineLandmarksFromHeatmap: a confidence-weighted mean over a 7x7 window."""
    grid = heatmap.shape[0]
    out = uv.copy()
    half = (HEATMAP_KERNEL - 1) // 2
    for i, (u, v) in enumerate(uv / LANDMARK_SIZE * grid):
        col, row = int(u), int(v)
        if not (0 <= col < grid and 0 <= row < grid):
            continue
        r0, r1 = max(0, row - half), min(grid, row + half + 1)
        c0, c1 = max(0, col - half), min(grid, col + half + 1)
        conf = _sigmoid(heatmap[r0:r1, c0:c1, i])
        if conf.max() >= 0.5:
            rows, cols = np.mgrid[r0:r1, c0:c1]
            out[i] = np.array([(cols * conf).sum(), (rows * conf).sum()]) / conf.sum()
            out[i] *= LANDMARK_SIZE / grid
    return out


class BlazePose:
    """BlazePose detector + landmark model on one image; thread-safe (one interpreter each)."""

    def __init__(self, weights: PoseWeights, num_threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.weights = weights
        self.num_threads = num_threads
        self._lock = threading.Lock()
        self._detector = Interpreter(model_path=str(weights.detector), num_threads=num_threads)
        self._landmarker = Interpreter(model_path=str(weights.landmarks), num_threads=num_threads)
        for interpreter in (self._detector, self._landmarker):
            interpreter.allocate_tensors()

    @staticmethod
    def _run(interpreter, tensor: np.ndarray) -> dict[str, np.ndarray]:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], tensor[None])
        interpreter.invoke()
        return {d["name"]: interpreter.get_tensor(d["index"])[0]
                for d in interpreter.get_output_details()}

    def detect(self, image: np.ndarray, box: tuple[int, int, int, int]) -> Roi | None:
        """The best person inside ``box`` (x0, y0, x1, y1) as the landmark model's ROI."""
        import cv2

        x0, y0, x1, y1 = box
        crop = image[y0:y1, x0:x1]
        scale = DETECTOR_SIZE / max(crop.shape[:2])
        pad = (DETECTOR_SIZE - np.array(crop.shape[1::-1]) * scale) / 2
        to_tensor = np.array([[scale, 0, pad[0]], [0, scale, pad[1]]])
        tensor = cv2.warpAffine(crop, to_tensor, (DETECTOR_SIZE, DETECTOR_SIZE),
                                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        out = self._run(self._detector, tensor.astype(np.float32) / 127.5 - 1.0)
        raw, scores = out["Identity"], _sigmoid(out["Identity_1"][:, 0])
        if scores.max() < MIN_DETECTION_SCORE:
            return None
        anchors = _anchors()
        centres = raw[:, :2] / DETECTOR_SIZE + anchors
        sizes = raw[:, 2:4] / DETECTOR_SIZE
        boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
        best = int(scores.argmax())
        # Weighted NMS as mediapipe: the best detection's cluster, averaged by score.
        cluster = (scores >= MIN_DETECTION_SCORE) & (_iou(boxes[best], boxes) > NMS_IOU)
        cluster[best] = True
        weights = scores[cluster][:, None, None]
        keypoints = raw[cluster, 4:8].reshape(-1, 2, 2) / DETECTOR_SIZE + anchors[cluster, None]
        keypoints = (keypoints * weights).sum(0) / weights.sum() * DETECTOR_SIZE
        in_image = (keypoints - pad) / scale + np.array([x0, y0])
        return _roi_from_points(in_image[0], in_image[1])

    def landmarks(self, image: np.ndarray, roi: Roi) -> tuple[Pose, Roi]:
        """33 keypoints in image pixels, and the ROI their auxiliary points give (tracking)."""
        import cv2

        matrix = roi.matrix(LANDMARK_SIZE)
        tensor = cv2.warpAffine(image, matrix, (LANDMARK_SIZE, LANDMARK_SIZE),
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REPLICATE)
        out = self._run(self._landmarker, tensor.astype(np.float32) / 255.0)
        raw = out["Identity"].reshape(-1, 5)  # 39 x (x, y, z, visibility, presence)
        uv = _refine_from_heatmap(raw[:, :2], out["Identity_3"])
        xy = np.c_[uv, np.ones(len(uv))] @ matrix.T
        visibility, presence = _sigmoid(raw[:, 3]), _sigmoid(raw[:, 4])
        keypoints = [
            Keypoint(name=name, x=float(xy[i, 0]), y=float(xy[i, 1]),
                     confidence=float(visibility[i]), presence=float(presence[i]))
            for i, name in enumerate(KEYPOINT_NAMES)
        ]
        pose = Pose(score=float(out["Identity_1"].ravel()[0]), keypoints=keypoints)
        return pose, _roi_from_points(xy[33], xy[34])

    def estimate(self, image: np.ndarray, box: tuple[int, int, int, int] | None = None) -> Pose:
        """Keypoints of the person in ``box`` (default: the whole image), in image pixels.

        When the detector finds nobody (flat 2D art often), the ROI is guessed from the box and
        refined once from the model's own auxiliary points, as mediapipe tracks between frames.
        """
        h, w = image.shape[:2]
        box = box or (0, 0, w, h)
        with self._lock:
            roi = self.detect(image, box)
            if roi is not None:
                return self.landmarks(image, roi)[0]
            x0, y0, x1, y1 = box
            guess = Roi((x0 + x1) / 2, (y0 + y1) / 2, ROI_SCALE * max(x1 - x0, y1 - y0), 0.0)
            pose, tracked = self.landmarks(image, guess)
            return self.landmarks(image, tracked)[0] if pose.score >= 0.5 else pose


def load_pose(
    source: str = POSE_SOURCE,
    mode: ModelsMode = "auto",
    cache_dir: Path | None = None,
    num_threads: int = 1,
) -> BlazePose | None:
    """BlazePose from ``source`` (see :func:`resolve_pose_weights`).

    There is no tiny pose model: every mode uses the real one. ``"real"`` raises when it cannot
    be had; ``"auto"`` and ``"tiny"`` warn loudly and return ``None`` (no keypoints).
    """
    return load_or_tiny(
        "real" if mode == "real" else "auto",  # tiny too: the real models are the only ones
        lambda: BlazePose(resolve_pose_weights(source, cache_dir), num_threads), lambda: None,
        weights=f"pose models {source!r}", fallback="RUNNING WITHOUT POSE KEYPOINTS",
        consequence="parses carry no keypoints",
        errors=(OSError, ValueError, subprocess.TimeoutExpired, zipfile.BadZipFile))
