"""The Python clients and the ``atelier3d segment`` / ``parse`` CLI against the real server (real
HTTP)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atelier3d.clients import ApiError, AsyncClient, Client, mask_to_array
from atelier3d.samples import drawn_character
from tests.helpers import free_port

IMAGE = drawn_character(192, 320)
H, W = IMAGE.shape[:2]
TIMEOUT_S = 300.0  # per request: a shared, slow machine may queue the encoder for a while
SHIRT, FACE, SKIRT = (96, 130), (96, 55), (96, 200)
REPO = Path(__file__).resolve().parents[1]


def png_image(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def crop_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_sync_client_full_flow(server, tmp_path):
    path = tmp_path / "character.png"
    Image.fromarray(IMAGE).save(path)
    with Client(server, timeout=TIMEOUT_S) as client:
        assert client.health() == {"status": "ok"}
        ready = client.ready()
        assert ready.ready and ready.weights == "untrained"

        info = client.create_session(path, wait=True)  # a path; arrays are tested below
        assert (info.width, info.height) == (W, H)
        assert info.embedding == "ready" and info.objects == []
        sid = info.session_id
        assert client.get_session(sid).session_id == sid

        # Points: three candidates, the best one selected, RLEs of the image's size.
        result = client.segment(sid, points=[SHIRT])
        assert len(result.masks) == 3
        scores = [m.score for m in result.masks]
        assert result.selected == int(np.argmax(scores))
        assert result.object_id is None and result.step is None
        for candidate in result.masks:
            mask = mask_to_array(candidate)
            assert mask.shape == (H, W) and mask.dtype == bool
            assert int(mask.sum()) == candidate.area
        assert Client.mask_to_array(result.masks[0].rle.model_dump()).shape == (H, W)

        # Background label, a single mask, numpy prompts.
        single = client.segment(sid, points=np.array([SHIRT, FACE]), labels=np.array([1, 0]),
                                multimask=False)
        assert len(single.masks) == 1 and single.selected == 0

        # A box alone, then a box with a point and a previous mask as input (a bool array).
        boxed = client.segment(sid, box=(60, 95, 132, 170))
        assert len(boxed.masks) == 3
        previous = mask_to_array(boxed.masks[boxed.selected])
        refined = client.segment(sid, points=[SHIRT], box=[60, 95, 132, 170], mask_input=previous)
        assert len(refined.masks) == 3

        # An invalid prompt is refused here, before any request.
        with pytest.raises(ValueError, match="at least one point or a box"):
            client.segment(sid)

        # Objects: history with undo/redo/reset, select, cut-out of the selected mask.
        obj = client.create_object(sid)
        oid = obj.object_id
        assert (obj.step, obj.can_undo, obj.can_redo, obj.masks) == (0, False, False, [])
        assert oid in client.get_session(sid).objects
        first = client.segment(sid, points=[SHIRT], object_id=oid)
        assert (first.object_id, first.step) == (oid, 1)
        second = client.segment(sid, points=[SHIRT, SKIRT], labels=[1, 1], object_id=oid)
        assert second.step == 2
        state = client.get_object(sid, oid)
        assert state.step == 2 and state.can_undo and not state.can_redo
        assert [tuple(p) for p in state.points] == [SHIRT, SKIRT] and state.labels == [1, 1]
        assert state.masks == second.masks and state.selected == second.selected

        undone = client.undo(sid, oid)
        assert (undone.step, undone.can_undo, undone.can_redo) == (1, True, True)
        assert [tuple(p) for p in undone.points] == [SHIRT]
        assert undone.masks == first.masks
        redone = client.redo(sid, oid)
        assert (redone.step, redone.can_redo) == (2, False)
        assert redone.masks == second.masks

        refine = client.segment(sid, points=[SHIRT, SKIRT, FACE], labels=[1, 1, 0],
                                refine=True, object_id=oid)
        assert refine.step == 3
        assert client.undo(sid, oid).step == 2

        chosen = (second.selected + 1) % 3
        picked = client.select(sid, oid, chosen)
        assert picked.selected == chosen and picked.step == 2
        with pytest.raises(ApiError) as bad_index:
            client.select(sid, oid, 7)
        assert (bad_index.value.status, bad_index.value.code) == (400, "bad_request")
        assert "candidate 7" in bad_index.value.message

        # Cut-out of the object's selected mask: RGBA, cropped to the mask's bounding box.
        mask = mask_to_array(second.masks[chosen])
        x0, y0, x1, y1 = crop_box(mask)
        cut = png_image(client.cutout(sid, object_id=oid))
        assert cut.mode == "RGBA" and cut.size == (x1 - x0, y1 - y0)
        alpha = np.asarray(cut)[..., 3]
        np.testing.assert_array_equal(alpha > 0, mask[y0:y1, x0:x1])

        # Cut-out of a mask given here (a bool array): a known rectangle, exact pixels.
        rect = np.zeros((H, W), bool)
        rect[100:160, 50:90] = True
        cut = png_image(client.cutout(sid, rle=rect))
        assert cut.mode == "RGBA" and cut.size == (40, 60)
        np.testing.assert_array_equal(np.asarray(cut)[..., :3], IMAGE[100:160, 50:90])
        assert (np.asarray(cut)[..., 3] == 255).all()
        full = png_image(client.cutout(sid, rle=rect, background="white", crop=False))
        assert full.mode == "RGB" and full.size == (W, H)
        assert (np.asarray(full)[0, 0] == 255).all()

        # Reset empties the object as an undoable step.
        reset = client.reset(sid, oid)
        assert (reset.masks, reset.points, reset.selected, reset.can_undo) == ([], [], None, True)
        with pytest.raises(ApiError) as no_mask:
            client.cutout(sid, object_id=oid)
        assert (no_mask.value.status, no_mask.value.code) == (409, "conflict")
        restored = client.undo(sid, oid)
        assert restored.masks == second.masks and restored.selected == chosen

        client.delete_object(sid, oid)
        with pytest.raises(ApiError) as gone_object:
            client.get_object(sid, oid)
        assert (gone_object.value.status, gone_object.value.code) == (404, "not_found")

        # Server-side validation errors come back as ApiError too.
        with pytest.raises(ApiError) as outside:
            client.segment(sid, points=[(W + 50, 10)])
        assert outside.value.status == 400 and "outside" in outside.value.message

        client.delete_session(sid)
        for call in (lambda: client.get_session(sid),
                     lambda: client.segment(sid, points=[SHIRT]),
                     lambda: client.delete_session(sid)):
            with pytest.raises(ApiError) as missing:
                call()
            assert (missing.value.status, missing.value.code) == (404, "not_found")
            assert missing.value.message


def test_upload_forms_and_upload_errors(server):
    with Client(server, timeout=TIMEOUT_S) as client:
        pil = Image.fromarray(IMAGE)
        png = io.BytesIO()
        pil.save(png, format="PNG")
        for image in (IMAGE, pil, png.getvalue()):
            info = client.create_session(image)
            assert (info.width, info.height) == (W, H)
            client.delete_session(info.session_id)
        with pytest.raises(ApiError) as not_image:
            client.create_session(b"certainly not an image")
        assert (not_image.value.status, not_image.value.code) == (415, "unsupported_media_type")
        with pytest.raises(ValueError):
            client.create_session(IMAGE.astype(np.float32))


async def test_async_client_concurrent_segments(server):
    prompts = [SHIRT, FACE, SKIRT, (40, 60), (150, 280), (96, 300)]
    async with AsyncClient(server, timeout=TIMEOUT_S) as client:
        assert await client.health() == {"status": "ok"}
        info = await client.create_session(IMAGE, wait=True)
        sid = info.session_id
        objects = await asyncio.gather(*(client.create_object(sid) for _ in prompts))
        oids = [o.object_id for o in objects]
        assert len(set(oids)) == len(prompts)

        results = await asyncio.gather(*(
            client.segment(sid, points=[p], object_id=oid, multimask=i % 2 == 0)
            for i, (p, oid) in enumerate(zip(prompts, oids, strict=True))
        ))
        for i, (result, oid) in enumerate(zip(results, oids, strict=True)):
            assert result.object_id == oid and result.step == 1
            assert len(result.masks) == (3 if i % 2 == 0 else 1)
            assert mask_to_array(result.masks[0]).shape == (H, W)

        # Each object recorded its own prompt: no answer went to the wrong request.
        states = await asyncio.gather(*(client.get_object(sid, oid) for oid in oids))
        for state, prompt, result in zip(states, prompts, results, strict=True):
            assert [tuple(p) for p in state.points] == [prompt]
            assert state.masks == result.masks

        # The same prompts one by one give the same masks as concurrently.
        for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
            again = await client.segment(sid, points=[prompt], multimask=i % 2 == 0)
            assert [m.rle for m in again.masks] == [m.rle for m in result.masks]
            assert [m.score for m in again.masks] == pytest.approx(
                [m.score for m in result.masks], abs=1e-5)

        await client.delete_session(sid)
        with pytest.raises(ApiError) as missing:
            await client.get_session(sid)
        assert (missing.value.status, missing.value.code) == (404, "not_found")


def run_cli(*args: str, command: str = "segment") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "atelier3d", command, *args],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )


def test_cli_segment_writes_cutout_and_rle(server, tmp_path):
    image = tmp_path / "character.png"
    Image.fromarray(IMAGE).save(image)
    out, rle_json = tmp_path / "out" / "cutout.png", tmp_path / "mask.json"
    proc = run_cli(str(image), "--point", f"{SHIRT[0]},{SHIRT[1]}",
                   "--point", f"{FACE[0]},{FACE[1]},0", "--server", server, "--pick", "1",
                   "-o", str(out), "--rle-json", str(rle_json))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    candidates = [line for line in lines if line.startswith("candidate ")]
    assert len(candidates) == 3 and all("score " in line for line in candidates)
    assert "picked" in candidates[1] and sum("picked" in line for line in candidates) == 1

    rle = json.loads(rle_json.read_text())
    assert set(rle) == {"size", "counts"} and rle["size"] == [H, W]
    mask = mask_to_array(rle)
    x0, y0, x1, y1 = crop_box(mask)
    cut = png_image(out.read_bytes())
    assert cut.mode == "RGBA" and cut.size == (x1 - x0, y1 - y0)
    np.testing.assert_array_equal(np.asarray(cut)[..., 3] > 0, mask[y0:y1, x0:x1])

    # The CLI cleans up its session.
    sid = lines[0].split()[1].rstrip(":")
    with Client(server, timeout=TIMEOUT_S) as client:
        with pytest.raises(ApiError) as missing:
            client.get_session(sid)
        assert missing.value.code == "not_found"

    # A box prompt and the default pick (the best-scoring candidate).
    boxed = tmp_path / "boxed.png"
    proc = run_cli(str(image), "--box", "60,95,132,170", "--server", server, "-o", str(boxed))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any("best, picked" in line for line in proc.stdout.splitlines())
    assert png_image(boxed.read_bytes()).mode == "RGBA"


def test_cli_errors(server, tmp_path):
    image = tmp_path / "character.png"
    Image.fromarray(IMAGE).save(image)
    out = tmp_path / "cutout.png"

    outside = run_cli(str(image), "--point", "5000,5000", "--server", server, "-o", str(out))
    assert outside.returncode == 1
    assert "outside" in outside.stderr and "Traceback" not in outside.stderr
    assert not out.exists()

    empty_box = run_cli(str(image), "--box", "50,50,50,80", "--server", server, "-o", str(out))
    assert empty_box.returncode == 2
    assert "box must be" in empty_box.stderr and "Traceback" not in empty_box.stderr

    no_prompt = run_cli(str(image), "--server", server, "-o", str(out))
    assert no_prompt.returncode == 2 and "--point" in no_prompt.stderr

    bad_point = run_cli(str(image), "--point", "1,2,3,4", "--server", server, "-o", str(out))
    assert bad_point.returncode == 2 and "X,Y" in bad_point.stderr

    down = f"http://127.0.0.1:{free_port()}"
    unreachable = run_cli(str(image), "--point", "10,10", "--server", down, "-o", str(out))
    assert unreachable.returncode == 1
    assert "cannot reach" in unreachable.stderr and "Traceback" not in unreachable.stderr
    assert not out.exists()


# ---- body and garment separation ---------------------------------------------------------------

FIGURE_BOX = (45, 15, 150, 310)  # around the figure in IMAGE (192x320)


def test_client_parse_and_its_assets(server):
    with Client(server, timeout=TIMEOUT_S) as client:
        sid = client.create_session(IMAGE, wait=True).session_id
        oid = client.create_object(sid).object_id
        client.segment(sid, box=FIGURE_BOX, object_id=oid, multimask=False)
        result = client.parse(sid, object_id=oid)
        assert result.object_id == oid and result.parts and result.labels
        assert client.get_parse(sid, result.parse_id) == result
        parse_map = png_image(client.parse_asset(result.parse_map_url))
        pose_map = png_image(client.parse_asset(result.pose_map_url))
        assert parse_map.mode == pose_map.mode == "RGB"
        assert parse_map.size == pose_map.size == (W, H)
        for part in result.parts:
            cut = png_image(client.parse_asset(part.url))
            assert cut.mode == "RGBA" and cut.size == tuple(part.bbox[2:])
        with zipfile.ZipFile(io.BytesIO(client.parse_asset(result.zip_url))) as archive:
            assert {f"{p.name}.png" for p in result.parts} <= set(archive.namelist())

        # A mask given as a boolean array goes as RLE; options change what is cut out.
        mask = mask_to_array(client.get_object(sid, oid).masks[0])
        only_hair = client.parse(sid, rle=mask, groups=["hair"], complete_occlusions=False)
        assert only_hair.labels == result.labels
        assert {p.name for p in only_hair.parts} <= {p.name for p in result.parts} | {"hair"}
        assert "clothing" not in {p.name for p in only_hair.parts}
        assert all(p.completed_url is None for p in only_hair.parts)

        with pytest.raises(ApiError) as empty:
            client.parse(sid, rle=np.zeros((H, W), bool))
        assert (empty.value.status, empty.value.code) == (400, "bad_request")
        with pytest.raises(ApiError) as missing:
            client.parse_asset(result.parse_map_url.replace("parse_map.png", "parts/Nope.png"))
        assert missing.value.status == 404
        with pytest.raises(ValueError):
            client.parse(sid)  # neither object_id nor rle
        with pytest.raises(ValueError):
            client.parse_asset("https://example.com/evil.png")
        client.delete_session(sid)


async def test_async_client_parse(server):
    async with AsyncClient(server, timeout=TIMEOUT_S) as client:
        sid = (await client.create_session(IMAGE, wait=True)).session_id
        seg = await client.segment(sid, box=FIGURE_BOX, multimask=False)
        results = await asyncio.gather(*(client.parse(sid, rle=seg.masks[0]) for _ in range(2)))
        assert results[0].parse_id != results[1].parse_id
        assert results[0].masks == results[1].masks
        data = await client.parse_asset(results[1].parse_map_url)
        assert png_image(data).size == (W, H)
        await client.delete_session(sid)


def test_cli_parse_writes_maps_parts_and_json(server, tmp_path):
    image = tmp_path / "character.png"
    Image.fromarray(IMAGE).save(image)
    out = tmp_path / "parsed"
    proc = run_cli(str(image), "--box", ",".join(map(str, FIGURE_BOX)), "--server", server,
                   "-o", str(out), command="parse")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("labels: ") for line in lines)
    assert sum(line.startswith("check ") for line in lines) == 4

    result = json.loads((out / "result.json").read_text())
    assert result["labels"] and result["parts"]
    assert result["character_mask"]["size"] == [H, W]
    for name in ("parse_map.png", "pose_map.png"):
        assert png_image((out / name).read_bytes()).size == (W, H)
    written = {p.name for p in (out / "parts").glob("*.png")}
    expected = {f"{p['name']}.png" for p in result["parts"]}
    expected |= {f"{p['name']}.completed.png" for p in result["parts"] if p["completed_url"]}
    assert written == expected
    for part in result["parts"]:
        cut = png_image((out / "parts" / f"{part['name']}.png").read_bytes())
        assert cut.mode == "RGBA" and cut.size == tuple(part["bbox"][2:])

    # The CLI cleans up its session.
    sid = lines[0].split()[1].rstrip(":")
    with Client(server, timeout=TIMEOUT_S) as client, pytest.raises(ApiError):
        client.get_session(sid)


def test_cli_parse_errors(server, tmp_path):
    image = tmp_path / "character.png"
    Image.fromarray(IMAGE).save(image)
    out = tmp_path / "parsed"
    # An API error (the point lies outside the image): a message and exit status 1.
    outside = run_cli(str(image), "--point", "5000,5000", "--server", server, "-o", str(out),
                      command="parse")
    assert outside.returncode == 1
    assert "outside" in outside.stderr and "Traceback" not in outside.stderr
    assert not out.exists()
    no_prompt = run_cli(str(image), "--server", server, "-o", str(out), command="parse")
    assert no_prompt.returncode == 2 and "--point" in no_prompt.stderr
    missing = run_cli(str(tmp_path / "nope.png"), "--point", "1,1", "--server", server,
                      "-o", str(out), command="parse")
    assert missing.returncode == 2 and "no such image" in missing.stderr
    down = f"http://127.0.0.1:{free_port()}"
    unreachable = run_cli(str(image), "--point", "10,10", "--server", down, "-o", str(out),
                          command="parse")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def rgba_cutout() -> np.ndarray:
    rgba = np.zeros((160, 128, 4), np.uint8)
    rgba[20:140, 30:100] = (200, 60, 40, 255)
    return rgba


def test_clients_submit_follow_and_fetch_jobs(server):
    from atelier3d.clients import ProgressBar

    with Client(server, timeout=TIMEOUT_S) as client:
        info = client.create_session(IMAGE, wait=True)
        submitted = client.submit_edit(info.session_id, prompt="make it blue", steps=2,
                                       width=256, height=256, idempotency_key="client-edit-1")
        again = client.submit_edit(info.session_id, prompt="make it blue", steps=2,
                                   width=256, height=256, idempotency_key="client-edit-1")
        assert again.job_id == submitted.job_id
        bar = io.StringIO()
        state = client.wait_job(submitted.job_id, ProgressBar("edit", stream=bar))
        assert state.status == "succeeded"
        assert "100%" in bar.getvalue() and "denoise 2/2" in bar.getvalue()
        assert png_image(client.job_result(submitted.job_id)).size == (256, 256)
        with pytest.raises(ApiError) as bad:
            client.submit_edit(info.session_id, preset="cubism")
        assert bad.value.status == 400 and "preset" in bad.value.message
        client.delete_session(info.session_id)

    async def mesh() -> bytes:
        async with AsyncClient(server, timeout=TIMEOUT_S) as client:
            job = await client.submit_mesh(image=rgba_cutout(), steps=2, octree_resolution=64)
            events = []
            state = await client.wait_job(job.job_id, events.append)
            assert state.status == "succeeded" and events[-1]["type"] == "succeeded"
            return await client.job_result(job.job_id, format="obj")

    assert b"\nv " in asyncio.run(mesh())


def test_cli_edit_and_mesh(server, tmp_path):
    import trimesh

    cutout = tmp_path / "cutout.png"
    Image.fromarray(rgba_cutout()).save(cutout)
    glb = tmp_path / "out" / "asset.glb"
    proc = run_cli(str(cutout), "--server", server, "--steps", "2", "--octree", "64",
                   "-o", str(glb), command="mesh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mesh: succeeded" in proc.stdout and "ETA" in proc.stderr
    scene = trimesh.load(glb, force="scene")
    assert len(scene.geometry) == 1

    photo = tmp_path / "character.png"
    Image.fromarray(IMAGE).save(photo)
    edited = tmp_path / "edited.png"
    proc = run_cli(str(photo), "--server", server, "--prompt", "make the skirt green",
                   "--steps", "2", "--width", "256", "--height", "256", "--quiet",
                   "-o", str(edited), command="edit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert png_image(edited.read_bytes()).size == (256, 256)

    proc = run_cli(str(photo), "--server", server, "-o", str(tmp_path / "x.glb"),
                   command="mesh")
    assert proc.returncode == 1 and "alpha" in proc.stderr
