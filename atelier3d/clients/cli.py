"""Client-side CLI commands (``atelier3d segment``...), talking HTTP to a running server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from atelier3d.clients.client import DEFAULT_BASE_URL


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


def cmd_segment(args: argparse.Namespace) -> int:
    import httpx
    from pydantic import ValidationError

    from atelier3d.clients.client import ApiError, Client, segment_call

    if not args.point and args.box is None:
        return fail("give at least one --point or a --box", 2)
    image = Path(args.image)
    if not image.is_file():
        return fail(f"no such image file: {image}", 2)
    points = [(x, y) for x, y, _ in args.point]
    labels = [label for _, _, label in args.point]
    try:
        segment_call("-", points=points or None, labels=labels or None, box=args.box)
    except ValidationError as exc:  # a prompt the request model refuses, e.g. an empty box
        return fail("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()), 2)
    try:
        with Client(args.server, timeout=args.timeout) as client:
            info = client.create_session(image, wait=True)
            try:
                print(f"session {info.session_id}: {info.width}x{info.height}")
                result = client.segment(info.session_id, points=points or None,
                                        labels=labels or None, box=args.box, multimask=True)
                picked = result.selected if args.pick == "best" else args.pick
                if picked >= len(result.masks):
                    return fail(f"--pick {picked}: the server returned {len(result.masks)} "
                                "candidate(s)")
                for i, mask in enumerate(result.masks):
                    marks = [m for m, on in (("best", i == result.selected),
                                             ("picked", i == picked)) if on]
                    x, y, w, h = mask.bbox
                    print(f"candidate {i}: score {mask.score:.4f}  area {mask.area}  "
                          f"bbox {x},{y},{w},{h}" + (f"  ({', '.join(marks)})" if marks else ""))
                chosen = result.masks[picked]
                png = client.cutout(info.session_id, rle=chosen.rle, background="transparent",
                                    crop=not args.no_crop)
            finally:
                try:
                    client.delete_session(info.session_id)
                except (ApiError, httpx.HTTPError):
                    pass  # it expires on its own
    except ApiError as exc:
        return fail(f"{exc.message} ({exc.status} {exc.code})")
    except httpx.ConnectError as exc:
        return fail(f"cannot reach {args.server}: {exc}")
    except httpx.HTTPError as exc:  # timeouts, dropped connections
        return fail(f"request to {args.server} failed: {exc or type(exc).__name__}")
    except OSError as exc:
        return fail(str(exc))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(png)
    print(f"wrote {args.output}")
    if args.rle_json is not None:
        args.rle_json.parent.mkdir(parents=True, exist_ok=True)
        args.rle_json.write_text(json.dumps(chosen.rle.model_dump(mode="json")) + "\n")
        print(f"wrote {args.rle_json}")
    return 0


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Registers the commands that talk to a running server."""
    segment = sub.add_parser(
        "segment",
        help="segment an image on a running server and write the cut-out",
        description="Uploads IMAGE, segments it with point and/or box prompts, and writes the "
        "transparent cut-out of the chosen candidate (and optionally its COCO RLE as JSON).",
    )
    segment.add_argument("image", help="image file (PNG, JPEG, WebP, ...)")
    segment.add_argument("--point", action="append", type=parse_point, default=[],
                         metavar="X,Y[,LABEL]",
                         help="a click in pixels; LABEL 1 = foreground (default), 0 = background; "
                         "repeatable (use --point=-X,Y for negative numbers)")
    segment.add_argument("--box", type=parse_box, metavar="X0,Y0,X1,Y1", help="a box in pixels")
    segment.add_argument("--server", default=DEFAULT_BASE_URL,
                         help=f"base URL of the server (default {DEFAULT_BASE_URL})")
    segment.add_argument("--pick", type=parse_pick, default="best", metavar="best|0|1|2",
                         help="which candidate to cut out (default: the best-scoring)")
    segment.add_argument("-o", "--output", type=Path, required=True,
                         help="where to write the cut-out PNG")
    segment.add_argument("--rle-json", type=Path, help="also write the chosen mask's RLE here")
    segment.add_argument("--no-crop", action="store_true",
                         help="keep the full image size instead of cropping to the mask")
    segment.add_argument("--timeout", type=float, default=360.0,
                         help="seconds per request (the upload waits for the encoder)")
    segment.set_defaults(func=cmd_segment)
