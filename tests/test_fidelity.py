"""Served masks equal segment-anything's own SamPredictor for the same checkpoint and prompts.

The reference runs here in-process with torch; the served path is Ray Serve -> torch encoder ->
object store -> ONNX Runtime decoder -> RLE over HTTP.
"""

from __future__ import annotations

import numpy as np
import pytest

from atelier3d import rle
from atelier3d.stages.segment import apply_coords, decoder_prompt, preprocess_shape
from tests.helpers import png_bytes

# Shapes: portrait, landscape, square, tiny, odd sizes.
SIZES = [(700, 333), (333, 701), (256, 256), (17, 29), (481, 1023)]
LOGIT_TIE = 1e-4  # a pixel whose torch logit is this close to 0 may flip on float rounding


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus blobs, so masks have structure."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([(xx * 255 / max(width - 1, 1)), (yy * 255 / max(height - 1, 1)),
                    np.full_like(xx, 128)], axis=-1).astype(np.float64)
    for _ in range(4):
        cy, cx = rs.rand() * height, rs.rand() * width
        r = (0.1 + rs.rand() * 0.3) * min(height, width)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rs.randint(0, 256, 3)
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def predictor(tiny_sam):
    from segment_anything import SamPredictor

    return SamPredictor(tiny_sam.build())


def prompts_for(height: int, width: int) -> list[dict]:
    return [
        {"points": [[width * 0.4, height * 0.5]], "labels": [1]},
        {"points": [[width * 0.3, height * 0.3], [width * 0.7, height * 0.6]], "labels": [1, 0]},
        {"box": [width * 0.1, height * 0.2, width * 0.8, height * 0.9]},
        {"points": [[width * 0.5, height * 0.5]], "labels": [1],
         "box": [width * 0.2, height * 0.1, width * 0.9, height * 0.7]},
    ]


def reference(predictor, prompt: dict, multimask: bool, mask_input=None):
    points = np.array(prompt["points"]) if prompt.get("points") else None
    labels = np.array(prompt["labels"]) if prompt.get("labels") else None
    box = np.array(prompt["box"]) if prompt.get("box") else None
    logits, scores, low_res = predictor.predict(
        points, labels, box, mask_input=mask_input, multimask_output=multimask, return_logits=True
    )
    return logits, scores, low_res


def assert_same_masks(served: list[dict], logits: np.ndarray) -> None:
    assert len(served) == len(logits)
    for candidate, ref_logits in zip(served, logits, strict=True):
        mask = rle.decode(candidate["rle"], ref_logits.shape)
        differ = mask != (ref_logits > 0)
        # Identical except where the reference logit sits on the threshold within float error.
        assert np.all(np.abs(ref_logits[differ]) < LOGIT_TIE), (
            f"{differ.sum()} pixels differ, max |logit| there {np.abs(ref_logits[differ]).max()}"
        )
        assert differ.sum() <= max(2, mask.size // 100_000)
        ref_mask = ref_logits > 0
        assert candidate["area"] == mask.sum()
        if ref_mask.any():
            ys, xs = np.nonzero(mask)
            assert candidate["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                         ys.max() - ys.min() + 1]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_served_masks_equal_sam_predictor(http, predictor, size):
    height, width = size
    image = synthetic_image(height, width, seed=height * width)
    session = http.post("/v1/sessions?wait=true", files={"image": ("x.png", png_bytes(image))})
    assert session.status_code == 201, session.text
    sid = session.json()["session_id"]
    assert (session.json()["width"], session.json()["height"]) == (width, height)
    predictor.set_image(image)
    nontrivial = 0
    for prompt in prompts_for(height, width):
        for multimask in (True, False):
            r = http.post(f"/v1/sessions/{sid}/segment", json={**prompt, "multimask": multimask})
            assert r.status_code == 200, r.text
            body = r.json()
            logits, scores, _ = reference(predictor, prompt, multimask)
            assert len(body["masks"]) == (3 if multimask else 1)
            np.testing.assert_allclose([m["score"] for m in body["masks"]], scores, atol=1e-4)
            assert_same_masks(body["masks"], logits)
            assert body["selected"] == int(np.argmax(scores))
            nontrivial += sum(0 < (lg > 0).mean() < 1 for lg in logits)
    assert nontrivial > 0, "every mask was empty or full: the comparison would prove nothing"
    http.delete(f"/v1/sessions/{sid}")


def test_refinement_with_previous_logits_matches(http, predictor):
    """The SAM interactive loop: click, pick a candidate, click again feeding its low-res logits."""
    height, width = 480, 640
    image = synthetic_image(height, width, seed=7)
    sid = http.post("/v1/sessions?wait=true", files={"image": ("x.png", png_bytes(image))}).json()[
        "session_id"
    ]
    oid = http.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
    first = {"points": [[300.0, 200.0]], "labels": [1]}
    r1 = http.post(f"/v1/sessions/{sid}/segment", json={**first, "object_id": oid}).json()
    assert r1["step"] == 1
    chosen = 2
    selected = http.post(f"/v1/sessions/{sid}/objects/{oid}/select", json={"index": chosen})
    assert selected.status_code == 200

    predictor.set_image(image)
    _, _, low_res = reference(predictor, first, True)
    second = {"points": [[300.0, 200.0], [100.0, 400.0]], "labels": [1, 0]}
    r2 = http.post(f"/v1/sessions/{sid}/segment",
                   json={**second, "object_id": oid, "refine": True}).json()
    logits, scores, _ = reference(predictor, second, True, mask_input=low_res[chosen][None])
    np.testing.assert_allclose([m["score"] for m in r2["masks"]], scores, atol=1e-4)
    assert_same_masks(r2["masks"], logits)
    assert r2["step"] == 2


def test_low_res_logits_match_torch_within_1e3(tiny_sam, tiny_dir, predictor):
    """The exported graph itself, in-process: ONNX vs torch low-res logits."""
    import onnxruntime as ort

    from atelier3d.optimizations.segment_onnx import cached_decoder_onnx

    for height, width in SIZES:
        image = synthetic_image(height, width, seed=1)
        predictor.set_image(image)
        embedding = predictor.get_image_embedding().numpy()
        for multimask in (True, False):
            path = cached_decoder_onnx(tiny_sam, tiny_dir, multimask=multimask)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for prompt in prompts_for(height, width):
                p = decoder_prompt((height, width), prompt.get("points"), prompt.get("labels"),
                                   prompt.get("box"), None)
                _, _, low = session.run(None, p.feeds(embedding))
                _, _, ref_low = reference(predictor, prompt, multimask)
                assert np.abs(low[0] - ref_low).max() <= 1e-3


def test_numpy_prompt_transform_matches_segment_anything():
    from segment_anything.utils.transforms import ResizeLongestSide

    transform = ResizeLongestSide(1024)
    rs = np.random.RandomState(0)
    for _ in range(200):
        h, w = rs.randint(1, 5000, 2)
        coords = rs.rand(5, 2) * [w, h]
        assert preprocess_shape(h, w) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)
        np.testing.assert_array_equal(apply_coords(coords, (h, w)),
                                      transform.apply_coords(coords, (h, w)))
