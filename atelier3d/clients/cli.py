"""Client-side CLI commands (``atelier3d segment``, ``atelier3d parse``), talking HTTP to a
running server."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from atelier3d.clients.client import (
    API_KEY_ENV,
    DEFAULT_BASE_URL,
    ApiError,
    Client,
    ProgressBar,
    mask_to_array,
    segment_call,
)


def parse_point(text: str) -> tuple[float, float, int]:
    """``X,Y`` or ``X,Y,LABEL`` (label 1 = foreground, the default; 0 = background)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y or X,Y,LABEL, got {text!r}") from None
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(f"label must be 0 or 1, got {label}")
    return x, y, label


def parse_box(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        if len(parts) != 4:
            raise ValueError
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1, got {text!r}") from None
    return x0, y0, x1, y1


def parse_pick(text: str) -> str | int:
    if text == "best":
        return text
    try:
        index = int(text)
    except ValueError:
        index = -1
    if index < 0:
        raise argparse.ArgumentTypeError(f"expected 'best' or a candidate index, got {text!r}")
    return index


def fail(message: str, status: int = 1) -> int:
    print(f"atelier3d: error: {message}", file=sys.stderr)
    return status


class CliError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def _prompt(args: argparse.Namespace) -> tuple[list[tuple[float, float]], list[int]]:
    """The ``--point``/``--box`` prompt, checked before anything is sent (exit status 2)."""
    from pydantic import ValidationError

    if not args.point and args.box is None:
        raise CliError("give at least one --point or a --box", 2)
    if not Path(args.image).is_file():
        raise CliError(f"no such image file: {args.image}", 2)
    points = [(x, y) for x, y, _ in args.point]
    labels = [label for _, _, label in args.point]
    try:
        segment_call("-", points=points or None, labels=labels or None, box=args.box)
    except ValidationError as exc:  # a prompt the request model refuses, e.g. an empty box
        raise CliError("; ".join(e["msg"].removeprefix("Value error, ")
                                 for e in exc.errors()), 2) from None
    return points, labels


@contextlib.contextmanager
def _session(client, image: Path) -> Iterator:
    """A session for ``image``, encoded, and deleted again at the end."""
    import httpx

    info = client.create_session(image, wait=True)
    try:
        print(f"session {info.session_id}: {info.width}x{info.height}")
        yield info
    finally:
        try:
            client.delete_session(info.session_id)
        except (ApiError, httpx.HTTPError):
            pass  # it expires on its own


def _segment(client, session_id: str, args: argparse.Namespace, points, labels,
             object_id: str | None = None):
    """Segments with the prompt, prints the candidates and returns the ``--pick``ed one (also
    selected in ``object_id``'s history when given)."""
    result = client.segment(session_id, points=points or None, labels=labels or None,
                            box=args.box, multimask=True, object_id=object_id)
    picked = result.selected if args.pick == "best" else args.pick
    if picked >= len(result.masks):
        raise CliError(f"--pick {picked}: the server returned {len(result.masks)} candidate(s)")
    if object_id is not None and picked != result.selected:
        client.select(session_id, object_id, picked)
    for i, mask in enumerate(result.masks):
        marks = [m for m, on in (("best", i == result.selected), ("picked", i == picked)) if on]
        x, y, w, h = mask.bbox
        print(f"candidate {i}: score {mask.score:.4f}  area {mask.area}  "
              f"bbox {x},{y},{w},{h}" + (f"  ({', '.join(marks)})" if marks else ""))
    return result.masks[picked]


def _run(args: argparse.Namespace, work: Callable[[], int]) -> int:
    """Runs ``work`` (which talks to the server), turning every failure into a message."""
    import httpx

    try:
        return work()
    except CliError as exc:
        return fail(exc.message, exc.status)
    except ApiError as exc:
        return fail(f"{exc.message} ({exc.status} {exc.code})")
    except httpx.ConnectError as exc:
        return fail(f"cannot reach {args.server}: {exc}")
    except httpx.HTTPError as exc:  # timeouts, dropped connections
        return fail(f"request to {args.server} failed: {exc or type(exc).__name__}")
    except OSError as exc:
        return fail(str(exc))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"wrote {path}")


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment an image on a running server and write the cut-out.

    Uploads IMAGE, segments it with point and/or box prompts, and writes the transparent cut-out
    of the chosen candidate (and optionally its COCO RLE as JSON).
    """
    def work() -> int:
        points, labels = _prompt(args)
        with Client(args.server, timeout=args.timeout, api_key=args.api_key) as client, \
                _session(client, Path(args.image)) as info:
            chosen = _segment(client, info.session_id, args, points, labels)
            png = client.cutout(info.session_id, rle=chosen.rle, background="transparent",
                                crop=not args.no_crop)
        _write(args.output, png)
        if args.rle_json is not None:
            _write(args.rle_json, (json.dumps(chosen.rle.model_dump(mode="json")) + "\n").encode())
        return 0

    return _run(args, work)


def cmd_parse(args: argparse.Namespace) -> int:
    """Separate a character's body and garments on a running server.

    Uploads IMAGE, segments the character with point and/or box prompts (as 'segment' does),
    parses it, and writes into OUTDIR: parse_map.png (ATR palette), pose_map.png (OpenPose
    skeleton), parts/<name>.png (RGBA cut-outs; <name>.completed.png where an occluded part was
    filled in) and result.json.
    """
    def work() -> int:
        points, labels = _prompt(args)
        with Client(args.server, timeout=args.timeout, api_key=args.api_key) as client, \
                _session(client, Path(args.image)) as info:
            chosen = _segment(client, info.session_id, args, points, labels)
            result = client.parse(info.session_id, rle=chosen.rle,
                                  complete_occlusions=not args.no_complete)
            files = {"parse_map.png": client.parse_asset(result.parse_map_url),
                     "pose_map.png": client.parse_asset(result.pose_map_url)}
            for part in result.parts:
                files[f"parts/{part.name}.png"] = client.parse_asset(part.url)
                if part.completed_url:
                    files[f"parts/{part.name}.completed.png"] = client.parse_asset(
                        part.completed_url)
        print(f"labels: {', '.join(result.labels) or 'none'}")
        print(f"keypoints: {len(result.keypoints)}  parts: {len(result.parts)}  "
              f"({result.timings_ms.total_ms:.0f} ms)")
        for check in result.checks:
            verdict = "pass" if check.passed else "FAIL"
            hint = f" -> {check.suggestion}" if check.suggestion else ""
            print(f"check {check.name}: {verdict}: {check.reason}{hint}")
        for name, data in files.items():
            _write(args.output / name, data)
        # The response as the server gave it (its URLs died with the session) and the mask used.
        summary = {**result.model_dump(mode="json"),
                   "character_mask": chosen.rle.model_dump(mode="json")}
        _write(args.output / "result.json", (json.dumps(summary, indent=1) + "\n").encode())
        return 0

    return _run(args, work)


def _optional_source(client, session_id: str, args: argparse.Namespace) -> dict:
    """The whole image, or with --point/--box, an object holding the picked candidate."""
    if not args.point and args.box is None:
        return {"kind": "original"}
    points, labels = _prompt(args)
    obj = client.create_object(session_id)
    _segment(client, session_id, args, points, labels, object_id=obj.object_id)
    return {"kind": "object", "object_id": obj.object_id}


def _follow(client, submitted, label: str, quiet: bool) -> None:
    print(f"job {submitted.job_id}")
    state = client.wait_job(submitted.job_id, None if quiet else ProgressBar(label))
    timings = ", ".join(f"{k} {v / 1000:.1f}s" for k, v in state.stage_ms.items())
    print(f"{label}: {state.status} in {state.finished_at - state.created_at:.1f}s ({timings})")


def read_mask(path: Path) -> np.ndarray:
    """A mask drawn as an image: light pixels (grey level over 127, or opaque ones of an image
    with alpha) are the region to repaint."""
    if not path.is_file():
        raise CliError(f"no such mask file: {path}", 2)
    try:
        with Image.open(path) as image:
            if image.mode in ("RGBA", "LA"):
                return np.asarray(image.getchannel("A")) > 127
            return np.asarray(image.convert("L")) > 127
    except OSError as exc:
        raise CliError(f"cannot read the mask {path}: {exc}", 2) from None


def _part_source(client, session_id: str, args: argparse.Namespace) -> dict:
    """With --part: the segmented character's parse, and that part of it."""
    if not args.point and args.box is None:
        raise CliError("--part needs the character: give --point or --box", 2)
    points, labels = _prompt(args)
    obj = client.create_object(session_id)
    _segment(client, session_id, args, points, labels, object_id=obj.object_id)
    parse = client.parse(session_id, object_id=obj.object_id)
    parts = {part.name: part for part in parse.parts}
    if args.part not in parts:
        raise CliError(f"no part {args.part!r} in the parse (it has: "
                       f"{', '.join(parts) or 'none'})")
    part = parts[args.part]
    if args.preset == "complete_occluded" and args.mask is None:
        if part.hidden is None:
            raise CliError(f"nothing hides part {args.part!r}: give --mask with the region to "
                           "complete")
        hidden = mask_to_array(part.hidden)
        # Shown before it runs: the region the completion repaints (edit it, pass it as --mask).
        print(f"hidden region of {args.part}: {int(hidden.sum())} px of {part.bbox[2]}x"
              f"{part.bbox[3]}")
        if args.region_out is not None:
            _write(args.region_out, _png(hidden))
    return {"kind": "part", "parse_id": parse.parse_id, "part": args.part}


def _png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def cmd_edit(args: argparse.Namespace) -> int:
    """Edit an image with text on a running server.

    Uploads IMAGE and edits it (or, with --point/--box, the segmented object's cut-out; adding
    --part NAME, that part of the object's parse) with a preset and/or a prompt, showing progress;
    writes the result PNG. complete_occluded on a part repaints what hid it (printed first, and
    written with --region-out) unless --mask gives another region. --reference adds a garment or
    reference image (a server with a multi-image model, e.g. Qwen-Image-Edit-2509).
    """
    def work() -> int:
        if not Path(args.image).is_file():
            raise CliError(f"no such image file: {args.image}", 2)
        mask = read_mask(args.mask) if args.mask is not None else None
        for reference in args.reference:
            if not reference.is_file():
                raise CliError(f"no such reference image: {reference}", 2)
        with Client(args.server, timeout=args.timeout, api_key=args.api_key) as client, \
                _session(client, Path(args.image)) as info, contextlib.ExitStack() as uploads:
            # Each reference is uploaded as a session of its own, named as an extra source.
            extra = [{"kind": "session",
                      "session_id": uploads.enter_context(_session(client, ref)).session_id}
                     for ref in args.reference]
            if args.part is not None:
                source = _part_source(client, info.session_id, args)
            else:
                source = _optional_source(client, info.session_id, args)
            submitted = client.submit_edit(
                info.session_id, prompt=args.prompt, preset=args.preset, source=source,
                seed=args.seed, steps=args.steps, negative_prompt=args.negative_prompt,
                true_cfg_scale=args.true_cfg_scale, width=args.width, height=args.height,
                mask=mask, extra_sources=extra)
            _follow(client, submitted, "edit", args.quiet)
            png = client.job_result(submitted.job_id)
        _write(args.output, png)
        return 0

    return _run(args, work)


def cmd_mesh(args: argparse.Namespace) -> int:
    """Make a 3D asset (GLB) from an image on a running server.

    Sends IMAGE (an RGBA cut-out as it is; with --point/--box, the segmented object of it;
    otherwise the server cuts the main object out) to the 3D stage, shows progress, and writes
    the mesh (format from --format or the output's suffix).
    """
    def work() -> int:
        if not Path(args.image).is_file():
            raise CliError(f"no such image file: {args.image}", 2)
        fmt = args.format or args.output.suffix.lstrip(".").lower() or "glb"
        params = {"seed": args.seed, "steps": args.steps, "octree_resolution": args.octree,
                  "target_face_count": args.faces, "texture": not args.no_texture}
        params = {k: v for k, v in params.items() if v is not None}
        with Client(args.server, timeout=args.timeout, api_key=args.api_key) as client:
            if args.point or args.box is not None:
                with _session(client, Path(args.image)) as info:
                    source = _optional_source(client, info.session_id, args)
                    submitted = client.submit_mesh(info.session_id, source=source, **params)
                    _follow(client, submitted, "mesh", args.quiet)
                    data = client.job_result(submitted.job_id, format=fmt)
            else:  # an RGBA cut-out goes as it is; without alpha, the server cuts it out
                submitted = client.submit_mesh(image=Path(args.image), **params)
                _follow(client, submitted, "mesh", args.quiet)
                data = client.job_result(submitted.job_id, format=fmt)
        _write(args.output, data)
        return 0

    return _run(args, work)


def cmd_character(args: argparse.Namespace) -> int:
    """Character to 3D: a layered GLB of a character on a running server, in one job.

    Uploads IMAGE, segments the character with point and/or box prompts, and runs one job that
    parses it, completes the --garment(s) where something hides them, optionally edits it to a
    front T-pose (--t-pose), runs the pre-3D checks and builds a layered asset (body, each
    garment, hair as named nodes), showing each stage. Writes into OUTDIR: character.glb, each
    edit as <stage>.png and stages.json (every stage's result and the checks).
    """
    def work() -> int:
        if not Path(args.image).is_file():
            raise CliError(f"no such image file: {args.image}", 2)
        points, labels = _prompt(args)
        if not points and args.box is None:
            raise CliError("give --point and/or --box around the character", 2)
        edit = {"seed": args.seed, "steps": args.steps, "width": args.width,
                "height": args.height}
        mesh = {"seed": args.seed, "steps": args.mesh_steps, "octree_resolution": args.octree,
                "texture": not args.no_texture}
        with Client(args.server, timeout=args.timeout, api_key=args.api_key) as client, \
                _session(client, Path(args.image)) as info:
            obj = client.create_object(info.session_id)
            _segment(client, info.session_id, args, points, labels, object_id=obj.object_id)
            submitted = client.submit_character(
                info.session_id, obj.object_id, garments=args.garment, t_pose=args.t_pose,
                edit={k: v for k, v in edit.items() if v is not None},
                mesh={k: v for k, v in mesh.items() if v is not None})
            _follow(client, submitted, "character", args.quiet)
            state = client.get_job(submitted.job_id)
            if state.status != "succeeded":
                message = state.error.message if state.error else state.status
                raise CliError(f"the character job {state.status}: {message}")
            files = {"character.glb": client.job_result(submitted.job_id)}
            stages = {a.name: a.meta for a in state.artifacts}
            for name, meta in stages.items():
                if meta.get("job_id") and name != "mesh":
                    files[f"{name}.png"] = client.job_result(meta["job_id"])
        for meta in stages.values():
            meta.pop("results", None)
        checks = stages.get("checks", {}).get("checks", [])
        for check in checks:
            print(f"check {check['name']}: {'pass' if check['passed'] else 'FAIL'}: "
                  f"{check['reason']}")
        print(f"nodes: {', '.join(stages.get('mesh', {}).get('nodes', []))}")
        summary = {"results": (state.result_meta or {}).get("results"), "stages": stages}
        files["stages.json"] = (json.dumps(summary, indent=1) + "\n").encode()
        for name, data in files.items():
            _write(args.output / name, data)
        return 0

    return _run(args, work)


def _add_command(sub: argparse._SubParsersAction, func: Callable[[argparse.Namespace], int],
                 output: str, metavar: str | None = None) -> argparse.ArgumentParser:
    """The command ``func`` runs (``cmd_<name>``): IMAGE with point/box prompts, the server to
    send it to, and where its output (``-o``) goes. Its docstring is its help: the first line,
    then the description."""
    summary, description = inspect.cleandoc(func.__doc__ or "").split("\n\n", 1)
    command = sub.add_parser(func.__name__.removeprefix("cmd_"),
                             help=summary[0].lower() + summary[1:].rstrip("."),
                             description=" ".join(description.split()))
    command.set_defaults(func=func)
    command.add_argument("image", help="image file (PNG, JPEG, WebP, ...)")
    command.add_argument("--point", action="append", type=parse_point, default=[],
                         metavar="X,Y[,LABEL]",
                         help="a click in pixels; LABEL 1 = foreground (default), 0 = background; "
                         "repeatable (use --point=-X,Y for negative numbers)")
    command.add_argument("--box", type=parse_box, metavar="X0,Y0,X1,Y1", help="a box in pixels")
    command.add_argument("--server", default=DEFAULT_BASE_URL,
                         help=f"base URL of the server (default {DEFAULT_BASE_URL})")
    command.add_argument("--api-key", default=None, metavar="KEY",
                         help=f"the server's API key (default ${API_KEY_ENV}, if set)")
    command.add_argument("--pick", type=parse_pick, default="best", metavar="best|0|1|2",
                         help="which candidate is the mask (default: the best-scoring)")
    command.add_argument("--timeout", type=float, default=360.0,
                         help="seconds per request (the upload waits for the encoder)")
    command.add_argument("-o", "--output", type=Path, required=True, metavar=metavar, help=output)
    return command


def _add_job_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--steps", type=int, help="diffusion steps (default: the server's)")
    command.add_argument("--quiet", action="store_true", help="no progress bar")


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Registers the commands that talk to a running server."""
    segment = _add_command(sub, cmd_segment, output="where to write the cut-out PNG")
    segment.add_argument("--rle-json", type=Path, help="also write the chosen mask's RLE here")
    segment.add_argument("--no-crop", action="store_true",
                         help="keep the full image size instead of cropping to the mask")

    parse = _add_command(sub, cmd_parse, output="folder for the results (created if needed)",
                         metavar="OUTDIR")
    parse.add_argument("--no-complete", action="store_true",
                       help="do not fill in the occluded parts of garments")

    edit = _add_command(sub, cmd_edit, output="where to write the PNG")
    edit.add_argument("--prompt", default="", help="what to change (added to the preset's)")
    edit.add_argument("--preset", default="free",
                      help="full_body, t_pose, complete_occluded or free (default)")
    edit.add_argument("--negative-prompt")
    edit.add_argument("--true-cfg-scale", type=float)
    edit.add_argument("--width", type=int)
    edit.add_argument("--height", type=int)
    edit.add_argument("--part", metavar="NAME",
                      help="edit this part of the character's parse (an ATR label or a group: "
                      "clothing, hair, body-skin); needs --point/--box")
    edit.add_argument("--mask", type=Path, metavar="PNG",
                      help="the region to repaint, white on black, sized like the edited image")
    edit.add_argument("--reference", type=Path, action="append", default=[], metavar="IMAGE",
                      help="a garment or reference image the edit uses besides IMAGE (at most "
                      "2; the prompt names them, e.g. 'dress the character in the coat of "
                      "image 2')")
    edit.add_argument("--region-out", type=Path, metavar="PNG",
                      help="with --part and complete_occluded: write the hidden region here")
    _add_job_arguments(edit)

    mesh = _add_command(sub, cmd_mesh, output="where to write the mesh (.glb, .obj, .ply or .stl)")
    mesh.add_argument("--format", choices=["glb", "obj", "ply", "stl"])
    mesh.add_argument("--octree", type=int, help="octree resolution of the surface extraction")
    mesh.add_argument("--faces", type=int, help="target face count after reduction")
    mesh.add_argument("--no-texture", action="store_true", help="the untextured shape only")
    _add_job_arguments(mesh)

    character = _add_command(sub, cmd_character, output="folder for the results (created if "
                             "needed)", metavar="OUTDIR")
    character.add_argument("--garment", action="append", default=[], metavar="LABEL",
                           help="an ATR garment to complete and build as its own node "
                           "(e.g. Upper-clothes, Pants); repeatable")
    character.add_argument("--t-pose", action="store_true",
                           help="edit to a front T-pose full body before 3D")
    character.add_argument("--width", type=int, help="the T-pose edit's width")
    character.add_argument("--height", type=int, help="the T-pose edit's height")
    character.add_argument("--mesh-steps", type=int, help="the mesh's diffusion steps")
    character.add_argument("--octree", type=int, help="octree resolution of the surfaces")
    character.add_argument("--no-texture", action="store_true", help="untextured meshes")
    _add_job_arguments(character)
