"""Body and garment separation: SegFormer parsing (tiny weights), BlazePose (the real models from
the mediapipe wheel), garment cut-outs, occlusion completion, pre-3D checks and the HumanParser
deployment class called in-process."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from atelier3d import rle
from atelier3d.api.parse import KEYPOINT_NAMES, Keypoint, Pose
from atelier3d.errors import BadRequest
from atelier3d.models.parse import segformer as P
from atelier3d.models.parse.checks import run_checks
from atelier3d.models.parse.garments import (
    complete_occlusion,
    extract_parts,
    feathered_alpha,
    hidden_region,
)
from atelier3d.models.parse.pose import load_pose
from atelier3d.samples import drawn_character, drawn_character_labels, photo
from atelier3d.stages import parse as atr
from atelier3d.stages.parse import render_pose_map

IMAGE = drawn_character()
LABELS = drawn_character_labels()
MASK = LABELS > 0


@pytest.fixture(scope="module")
def segformer_dir(tiny_dir):
    return P.tiny_segformer_dir(tiny_dir)


@pytest.fixture(scope="module")
def pose_model(tiny_dir):
    # The real BlazePose models, taken from the mediapipe wheel once into the ignored fixture dir.
    return load_pose(mode="real", cache_dir=tiny_dir)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def paste(part, shape) -> np.ndarray:
    """A part's RGBA back in a full-size canvas."""
    full = np.zeros((*shape, 4), np.uint8)
    x0, y0, x1, y1 = part.box
    full[y0:y1, x0:x1] = part.rgba
    return full


def synthetic_pose(points: dict[str, tuple[float, float]]) -> Pose:
    """Named points confidently seen; every other keypoint unseen."""
    return Pose(score=1.0, keypoints=[
        Keypoint(name=n, x=points.get(n, (0, 0))[0], y=points.get(n, (0, 0))[1],
                 confidence=1.0 if n in points else 0.0, presence=1.0 if n in points else 0.0)
        for n in KEYPOINT_NAMES
    ])


# --- SegFormer --------------------------------------------------------------------------------

def test_labels_are_atr_18_in_model_card_order():
    assert len(atr.LABELS) == 18 and atr.LABELS[0] == "Background" and atr.LABELS[17] == "Scarf"
    assert atr.LABELS[atr.UPPER_CLOTHES] == "Upper-clothes"
    assert atr.LABELS[atr.RIGHT_ARM] == "Right-arm"
    assert atr.PALETTE.shape == (18, 3) and len({tuple(c) for c in atr.PALETTE}) == 18
    assert atr.colorize(LABELS).shape == (*LABELS.shape, 3)


def test_tiny_segformer_round_trips_offline(tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants
    from safetensors.torch import load_file

    out = P.write_tiny_segformer(tmp_path / "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    parser = P.load_parser(str(out), mode="real")
    assert not parser.trained
    assert parser.model.config.id2label == dict(enumerate(atr.LABELS))
    assert parser.processor.size == {"height": 512, "width": 512}
    # Loaded weights are the saved ones: saving them again gives the same tensors (transformers 5
    # renames some modules on load, so the two state dicts are compared in the file layout).
    parser.model.save_pretrained(tmp_path / "again")
    saved, again = load_file(out / "model.safetensors"), load_file(tmp_path / "again" /
                                                                   "model.safetensors")
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert sum(p.numel() for p in parser.model.parameters()) < 1_000_000
    # The hub id cannot be had offline: "auto" falls back to tiny, loudly; "real" refuses.
    with caplog.at_level(logging.WARNING):
        fallback = P.load_parser(P.HUB_ID, mode="auto", cache_dir=tmp_path)
    assert not fallback.trained and "FALLING BACK TO TINY" in caplog.text
    with pytest.raises(OSError):
        P.load_parser(P.HUB_ID, mode="real", cache_dir=tmp_path)


def test_b2_config_is_full_size():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    with torch.device("meta"):
        model = SegformerForSemanticSegmentation(SegformerConfig(num_labels=18, **P.B2_CONFIG))
    assert 27_000_000 < sum(p.numel() for p in model.parameters()) < 28_000_000  # as the card


def test_parse_is_what_the_model_card_does(segformer_dir):
    parser = P.load_parser(str(segformer_dir), mode="real")
    image = photo("astronaut")[40:340, 100:300]  # not square, so H/W order matters
    labels = P.parse(parser.model, parser.processor, image)

    pil = Image.fromarray(image)  # the model card's own lines
    inputs = parser.processor(images=pil, return_tensors="pt")
    with torch.no_grad():
        logits = parser.model(**inputs).logits.cpu()
    upsampled = torch.nn.functional.interpolate(
        logits, size=pil.size[::-1], mode="bilinear", align_corners=False)
    expected = upsampled.argmax(dim=1)[0].numpy()

    assert labels.dtype == np.uint8 and labels.shape == image.shape[:2]
    np.testing.assert_array_equal(labels, expected)


# --- cut-outs and occlusion -------------------------------------------------------------------

def test_feathered_alpha_ramps_inside_the_edge_only():
    region = np.zeros((20, 20), bool)
    region[5:15, 5:15] = True
    alpha = feathered_alpha(region, 2)
    assert ((alpha > 0) == region).all()
    assert alpha[5, 10] == 85 and alpha[6, 10] == 170 and alpha[7, 10] == 255
    assert (alpha[7:13, 7:13] == 255).all()
    np.testing.assert_array_equal(feathered_alpha(region, 0), region * 255)


def test_parts_of_the_drawn_character_match_its_regions(human_parser):
    result = human_parser.parse(IMAGE, MASK, labels=LABELS)
    np.testing.assert_array_equal(result.label_map, LABELS)
    present = sorted(set(np.unique(LABELS)) - {0})
    assert result.labels == [atr.LABELS[i] for i in present]
    for i in present:
        np.testing.assert_array_equal(rle.decode(result.rles[atr.LABELS[i]], LABELS.shape),
                                      LABELS == i)

    parts = {p.name: p for p in result.parts}
    garments = [i for i in present if i in atr.GARMENT_LABELS]
    assert list(parts) == [atr.LABELS[i] for i in garments] + ["clothing", "hair", "body-skin"]
    expected = {atr.LABELS[i]: LABELS == i for i in garments}
    expected |= {g: np.isin(LABELS, ids) for g, ids in atr.GROUPS.items()}
    feather = human_parser.settings.feather_px
    for name, region in expected.items():
        full = paste(parts[name], LABELS.shape)
        assert iou(full[..., 3] > 0, region) == 1.0, name
        np.testing.assert_array_equal(full[region, :3], IMAGE[region])
        np.testing.assert_array_equal(full[..., 3], feathered_alpha(region, feather))
        box = parts[name].box
        assert parts[name].rgba.shape[:2] == (box[3] - box[1], box[2] - box[0])
    # Nothing hides any garment of this figure: no completion is invented.
    assert result.completed == {}


def test_mask_limits_labels_and_parts(human_parser):
    upper = MASK.copy()
    upper[340:] = False  # the character's mask stops at the waist
    result = human_parser.parse(IMAGE, upper, labels=LABELS)
    assert not result.label_map[340:].any()
    assert "Skirt" not in result.labels and "Upper-clothes" in result.labels
    assert all(p.box[3] <= 340 for p in result.parts)


def occluded_shirt() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The figure with its left forearm held across the shirt: image, labels, full shirt."""
    image, labels = IMAGE.copy(), LABELS.copy()
    shirt = labels == atr.UPPER_CLOTHES
    band = np.zeros_like(shirt)
    band[250:272, 150:300] = True
    labels[band] = atr.LEFT_ARM
    image[band] = (250, 222, 200)
    return image, labels, shirt


# A closing rounds off the hidden band's corners at the shirt's slanted sides; a hull does not.
@pytest.mark.parametrize("method, min_iou", [("convex", 0.99), ("close", 0.95)])
def test_complete_occlusion_fills_only_the_hidden_region(method, min_iou):
    image, labels, shirt = occluded_shirt()
    (part,) = extract_parts(image, labels, labels=(atr.UPPER_CLOTHES,), feather_px=2)
    occluders = part.crop(labels == atr.LEFT_ARM)
    hidden = hidden_region(part.region, occluders, method, close_px=15)
    # What the arm hides of the shirt is what is filled (up to the hull's rasterised slanted edge).
    assert not (hidden & ~occluders).any()
    assert iou(hidden, part.crop(shirt & (labels == atr.LEFT_ARM))) > min_iou

    completed = complete_occlusion(part.rgba, occluders, method=method, feather_px=2)
    changed = np.any(completed != part.rgba, axis=-1)
    rgb_changed = np.any(completed[..., :3] != part.rgba[..., :3], axis=-1)
    assert not (rgb_changed & ~hidden).any()
    # Alpha changes only in the hidden region and the feather seam along it (never down).
    near = np.zeros_like(hidden)
    ys, xs = np.nonzero(hidden)
    near[max(ys.min() - 3, 0):ys.max() + 4, :] = True
    assert not (changed & ~near).any()
    assert (completed[..., 3] >= part.rgba[..., 3]).all()
    # Filled with the shirt's own flat red, opaque except within the feather of the new edge.
    error = np.abs(completed[hidden, :3].astype(int) - (200, 60, 70))
    assert error.max() <= 4 and error.mean() < 1
    deep = feathered_alpha(part.region | hidden, 2) == 255
    assert (completed[hidden & deep, 3] == 255).all() and (completed[hidden, 3] == 255).mean() > 0.9
    assert iou(completed[..., 3] > 0, part.crop(shirt)) > min_iou
    # Without occluders nothing happens.
    np.testing.assert_array_equal(
        complete_occlusion(part.rgba, np.zeros_like(occluders), method=method), part.rgba)


def test_deployment_completes_occluded_garments(human_parser):
    image, labels, shirt = occluded_shirt()
    result = human_parser.parse(image, labels > 0, labels=labels)
    assert list(result.completed) == ["Upper-clothes"]
    part = next(p for p in result.parts if p.name == "Upper-clothes")
    assert iou(part.crop(shirt), result.completed["Upper-clothes"][..., 3] > 0) > 0.99


# --- pose ---------------------------------------------------------------------------------------

def test_pose_on_the_astronaut_photo_is_plausible(pose_model):
    from skimage import data
    from skimage.feature import Cascade

    image = photo("astronaut")
    pose = pose_model.estimate(image)
    assert pose.score > 0.9 and len(pose.keypoints) == 33
    # The nose is inside the face that scikit-image's own (LBP cascade) face detector finds.
    (face,) = Cascade(data.lbp_frontal_face_cascade_filename()).detect_multi_scale(
        img=image, scale_factor=1.2, step_ratio=1, min_size=(60, 60), max_size=(300, 300))
    nose = pose["nose"]
    assert face["c"] < nose.x < face["c"] + face["width"]
    assert face["r"] < nose.y < face["r"] + face["height"]
    assert pose["left_eye"].y < nose.y < pose["mouth_left"].y
    left, right = pose["left_shoulder"], pose["right_shoulder"]
    assert min(left.confidence, right.confidence, nose.confidence) > 0.9
    assert right.x < nose.x < left.x  # facing the camera: her left is on the image's right
    assert nose.y < min(left.y, right.y) < max(left.y, right.y) < pose["left_hip"].y
    assert max(left.y, right.y) < pose["right_hip"].y
    # Half-body photo: the legs are out of the frame and the model says so.
    assert max(pose["left_ankle"].confidence, pose["right_ankle"].confidence) < 0.1
    # Same as mediapipe 0.10.21 itself (numbers from its Pose solution, model_complexity=1).
    for name, (x, y) in {"nose": (222.7, 128.0), "left_shoulder": (306.2, 256.6),
                         "right_shoulder": (112.7, 240.0)}.items():
        assert abs(pose[name].x - x) < 3 and abs(pose[name].y - y) < 3, name


def test_pose_map_is_an_openpose_skeleton(pose_model):
    pose = pose_model.estimate(photo("astronaut"))
    canvas = render_pose_map(pose, (512, 512))
    assert canvas.shape == (512, 512, 3) and canvas.dtype == np.uint8
    drawn = canvas.any(axis=-1)
    assert 0.005 < drawn.mean() < 0.2
    nose = pose["nose"]
    assert tuple(canvas[round(nose.y), round(nose.x)]) == (255, 0, 0)  # OpenPose point 0 colour
    assert not render_pose_map(None, (64, 32)).any()


def test_pose_weights_from_a_local_wheel(tmp_path, pose_model):
    import zipfile

    from atelier3d.models.parse.pose import WHEEL_MEMBERS, resolve_pose_weights

    # A wheel laid down by hand (an offline machine): same layout as mediapipe's.
    wheel = tmp_path / "mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl"
    source = {"pose_detection.tflite": pose_model.weights.detector,
              "pose_landmark_full.tflite": pose_model.weights.landmarks}
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, member in WHEEL_MEMBERS.items():
            archive.write(source[name], member)
    weights = resolve_pose_weights(str(wheel), cache_dir=tmp_path)
    assert weights.sha256 == pose_model.weights.sha256 and weights.variant == "blazepose-full"
    empty = tmp_path / "mediapipe-0.10.22-py3-none-any.whl"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(FileNotFoundError, match="no mediapipe/modules"):
        resolve_pose_weights(str(empty), cache_dir=tmp_path)


def test_pose_weights_fallback(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert load_pose(str(tmp_path), mode="auto") is None
    assert "WITHOUT POSE" in caplog.text
    with pytest.raises(FileNotFoundError):
        load_pose(str(tmp_path), mode="real")
    with pytest.raises(ValueError):
        load_pose("openpose", mode="real", cache_dir=tmp_path)


# --- checks -------------------------------------------------------------------------------------

T_POSE = {"nose": (192, 120), "left_eye": (205, 110), "right_eye": (180, 110),
          "left_shoulder": (240, 200), "right_shoulder": (144, 200),
          "left_elbow": (300, 200), "right_elbow": (84, 200),
          "left_wrist": (360, 200), "right_wrist": (24, 200),
          "left_hip": (220, 360), "right_hip": (164, 360), "left_knee": (220, 470),
          "right_knee": (164, 470), "left_ankle": (220, 580), "right_ankle": (164, 580)}


def checks_by_name(pose, image=IMAGE, mask=MASK, labels=LABELS):
    return {c.name: c for c in run_checks(image, mask, labels, pose)}


def test_checks_pass_for_a_front_t_pose_on_a_plain_background():
    checks = checks_by_name(synthetic_pose(T_POSE))
    assert all(c.passed for c in checks.values()), checks
    assert all(c.suggestion == "" for c in checks.values())


def test_checks_catch_each_problem():
    down = T_POSE | {"left_elbow": (245, 270), "right_elbow": (139, 270),
                     "left_wrist": (248, 330), "right_wrist": (136, 330)}
    check = checks_by_name(synthetic_pose(down))["t_or_a_pose"]
    assert not check.passed and "hangs" in check.reason and "T-pose" in check.suggestion

    back = T_POSE | {"left_shoulder": (144, 200), "right_shoulder": (240, 200)}
    assert not checks_by_name(synthetic_pose(back))["facing_front"].passed

    no_legs = {k: v for k, v in T_POSE.items() if "ankle" not in k}
    check = checks_by_name(synthetic_pose(no_legs))["full_body_visible"]
    assert not check.passed and "left ankle" in check.reason

    half = MASK.copy()
    half[300:] = False
    half[-1, 150:200] = True  # touches the bottom edge: cut off
    check = checks_by_name(None, mask=half, labels=np.where(half, LABELS, 0))["full_body_visible"]
    assert not check.passed and "bottom" in check.reason and "parse map only" not in check.reason

    astronaut = photo("astronaut")
    mask = np.zeros(astronaut.shape[:2], bool)
    mask[60:, 60:380] = True
    check = checks_by_name(None, image=astronaut, mask=mask,
                           labels=np.zeros_like(mask, np.uint8))["clean_background"]
    assert not check.passed and check.suggestion
    assert not checks_by_name(None)["t_or_a_pose"].passed  # no pose: not evaluated


# --- the deployment -----------------------------------------------------------------------------

def test_parse_maps_everything_back_to_the_full_image(human_parser):
    canvas = np.empty((800, 560, 3), np.uint8)
    canvas[:] = IMAGE[0, 0]
    labels = np.zeros(canvas.shape[:2], np.uint8)
    canvas[80:720, 60:444] = IMAGE
    labels[80:720, 60:444] = LABELS
    result = human_parser.parse(canvas, labels > 0)  # the tiny SegFormer's own labels
    assert result.size == (800, 560) and result.label_map.shape == (800, 560)
    assert not result.label_map[labels == 0].any()
    x0, y0, x1, y1 = result.box
    assert x0 < 60 + 97 and y0 < 80 + 40 and x1 > 60 + 288 and y1 > 80 + 610
    for name, encoded in result.rles.items():
        np.testing.assert_array_equal(rle.decode(encoded, (800, 560)),
                                      result.label_map == atr.LABEL_IDS[name])
    assert len(result.keypoints) == 33
    face = np.argwhere(labels == atr.FACE)
    (fy0, fx0), (fy1, fx1) = face.min(0), face.max(0)
    nose = result.pose["nose"]
    assert fx0 <= nose.x <= fx1 and fy0 <= nose.y <= fy1
    assert [c.name for c in result.checks] == ["full_body_visible", "facing_front",
                                                "t_or_a_pose", "clean_background"]
    assert set(result.timings_ms) == {"parse_ms", "pose_ms", "parts_ms"}


def test_info_names_both_models(human_parser):
    info = human_parser.info()
    assert info.model_type == "segformer-random+blazepose-full"
    assert info.weights == "untrained" and len(info.checkpoint_sha256) == 64


@pytest.mark.parametrize("image, mask, labels, message", [
    (IMAGE, np.zeros_like(MASK), None, "empty"),
    (IMAGE, MASK[:-1], None, "mask is"),
    (IMAGE.astype(np.float32), MASK, None, "uint8"),
    (IMAGE[..., 0], MASK, None, "RGB"),
    (IMAGE, MASK, LABELS.astype(np.int16) + 18, "label map"),
    (IMAGE, MASK, LABELS[:10], "label map"),
])
def test_bad_input_is_a_bad_request(human_parser, image, mask, labels, message):
    with pytest.raises(BadRequest, match=message):
        human_parser.parse(image, mask, labels=labels)


def test_make_tiny_writes_every_tiny_checkpoint(tmp_path):
    from atelier3d.cli import main
    from atelier3d.models.edit import qwen_image_edit as qwen_edit
    from atelier3d.models.mesh import hunyuan3d

    assert main(["models", "make-tiny", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "parsing" / P.TINY_DIR / "model.safetensors").is_file()
    assert (tmp_path / "parsing" / P.TINY_DIR / "preprocessor_config.json").is_file()
    edit = qwen_edit.tiny_edit_dir(tmp_path)
    assert edit.is_relative_to(tmp_path) and (edit / "model_index.json").is_file()
    shape = hunyuan3d.tiny_shape3d_dir(tmp_path) / hunyuan3d.TINY_SUBFOLDER
    assert shape.is_relative_to(tmp_path)
    assert {p.name for p in shape.iterdir()} == {"config.yaml", "model.fp16.safetensors"}
