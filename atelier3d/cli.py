"""``atelier3d`` command line: serve, models, and one command per stage."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from atelier3d import hardware
from atelier3d.clients.cli import add_client_commands
from atelier3d.clients.recipe_cli import add_recipe_commands
from atelier3d.config import AppConfig
from atelier3d.models import pull
from atelier3d.serve import runner


def serve_config_path(explicit: str | None) -> tuple[Path, str]:
    """The Serve YAML ``serve`` runs, and why: ``--config`` when given, else the packaged
    profile that fits this machine's GPUs."""
    if explicit:
        return Path(explicit), f"config {explicit}: given by --config"
    choice = hardware.choose_profile(hardware.detect_gpus())
    return runner.packaged_config_path(choice.file), choice.reason


def cmd_serve(args: argparse.Namespace) -> int:
    path, reason = serve_config_path(args.config)
    print(reason, flush=True)
    config = runner.load_serve_config(path, models=args.models, port=args.port)
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    port = config.get("http_options", {}).get("port", 8000)
    host = config.get("http_options", {}).get("host", "127.0.0.1")
    apps = [AppConfig.model_validate(app.get("args") or {}) for app in config["applications"]]
    real = [app for app in apps if app.models == "real"]
    background = None
    if real:
        if not args.verbose:  # a line per request would drown the progress bars
            logging.getLogger("httpx").setLevel(logging.WARNING)
        try:
            background = pull.pull_for_serving(real, sys.stderr)
        except (pull.PullError, OSError, httpx.HTTPError) as exc:
            print(f"atelier3d serve: the weights cannot be pulled: {exc}", file=sys.stderr)
            return 1
        # Pulled (or being pulled) by this process: a replica that went to the hub itself would
        # download unseen, and race the pull.
        runner.load_from_cache_only(config)
    stop_event = threading.Event()

    def on_signal(*_) -> None:
        stop_event.set()

    def install_handlers() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    install_handlers()
    try:
        runner.init_ray(num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                        metrics_port=args.metrics_port)
        install_handlers()  # ray.init replaces the SIGTERM handler with one that just dies
        runner.deploy(config, stop=stop_event,
                      busy=background.running if background is not None else None)
        if not stop_event.is_set():
            print(f"atelier3d is serving the UI and API on http://{host}:{port} (Ctrl-C stops)",
                  flush=True)
            stop_event.wait()
    finally:
        print("shutting down Serve and Ray...", flush=True)
        runner.stop()
    # Every Ray process has exited; the interpreter's own teardown after Ray's native core
    # worker would take another 2-3.5 s (measured), which a stopping server owes nobody.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    # torch and the model libraries load here, not for every command of the CLI
    from atelier3d.models.edit.qwen_image_edit import tiny_edit_dir, tiny_lightning_dir
    from atelier3d.models.mesh import hunyuan3d, paint
    from atelier3d.models.parse import segformer as parsing
    from atelier3d.models.segment.sam import (
        RANDOM_VIT_B_NAME,
        tiny_checkpoint,
        write_random_checkpoint,
    )

    out = Path(args.dir)
    tiny = tiny_checkpoint(out)
    print(f"SAM tiny ({tiny.model_type}): {tiny.path}")
    print(f"SegFormer tiny (ATR 18): {parsing.tiny_segformer_dir(out)}")
    print(f"Qwen-Image-Edit tiny (diffusers layout): {tiny_edit_dir(out)}")
    print(f"Qwen-Image-Edit-2509 tiny (diffusers layout): {tiny_edit_dir(out, plus=True)}")
    print(f"Qwen-Image-Lightning tiny (its edit LoRA files): {tiny_lightning_dir(out)}")
    shape = hunyuan3d.tiny_shape3d_dir(out) / hunyuan3d.TINY_SUBFOLDER
    print(f"Hunyuan3D tiny (hy3dgen layout): {shape}")
    print(f"Hunyuan3D-Paint tiny ({paint.PAINT_SUBFOLDER}, {paint.DELIGHT_SUBFOLDER} layouts): "
          f"{paint.tiny_paint_dir(out)}")
    if args.full_size:
        path = write_random_checkpoint(out / "sam" / RANDOM_VIT_B_NAME, "vit_b")
        print(f"SAM vit_b, random weights: {path}")
        path = parsing.write_random_segformer_b2(out / "parsing" / parsing.B2_DIR)
        print(f"SegFormer B2, random weights: {path}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        print("atelier3d models pull: --jobs must be at least 1", file=sys.stderr)
        return 2
    if not args.verbose:  # a line per request would drown the progress bars
        logging.getLogger("httpx").setLevel(logging.WARNING)
    path, reason = serve_config_path(args.config)
    print(reason, flush=True)
    config = runner.load_serve_config(path)
    apps = [AppConfig.model_validate(app.get("args") or {}) for app in config["applications"]]
    try:
        plan = pull.plan_pull(apps)
        print(pull.describe(plan), flush=True)
        if args.dry_run:
            return 0
        started = time.perf_counter()
        received = pull.pull(plan, apps[0].cache_path, sys.stderr, verify_present=args.verify,
                             jobs=args.jobs)
    except (pull.PullError, OSError, httpx.HTTPError) as exc:
        print(f"atelier3d models pull: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    print(f"pulled: {pull.human_bytes(received)} received in {seconds:.1f} s; every model the "
          "config names is on disk", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atelier3d", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start a local Ray and serve the UI + API")
    serve.add_argument("--config", help="Serve YAML (default: the packaged profile for this "
                       "machine's GPUs: local.yaml without one, gpu-24g.yaml or gpu-80g.yaml)")
    serve.add_argument("--models", choices=["auto", "tiny", "real"], default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--num-cpus", type=float, default=None, help="logical CPUs for Ray")
    serve.add_argument("--num-gpus", type=float, default=None, help="logical GPUs for Ray")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="Prometheus metrics port (Ray's metrics agent; default: Ray's choice)")
    serve.add_argument("--print-config", action="store_true",
                       help="print the profile chosen and the resolved Serve config, start nothing")
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="model weights")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    tiny = models_sub.add_parser("make-tiny", help="write tiny random checkpoints (tests)")
    tiny.add_argument("--dir", required=True)
    tiny.add_argument("--full-size", action="store_true",
                      help="also write full-size vit_b and SegFormer-B2 with random weights "
                           "(benchmarks)")
    tiny.set_defaults(func=cmd_make_tiny)
    fetch = models_sub.add_parser(
        "pull", help="fetch every model the Serve config names (resumable, checked), before "
        "serving")
    fetch.add_argument("--config", help="Serve YAML (default: the profile serve would pick)")
    fetch.add_argument("--dry-run", action="store_true",
                       help="print what would be fetched, and the sizes; fetch nothing")
    fetch.add_argument("--verify", action="store_true",
                       help="also re-check the digests of files already on disk")
    fetch.add_argument("--jobs", type=int, default=4, help="files fetched at once (default 4)")
    fetch.set_defaults(func=cmd_pull)

    add_client_commands(sub)
    add_recipe_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
