"""``atelier3d`` command line: serve, models, and one command per stage."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path


def cmd_serve(args: argparse.Namespace) -> int:
    from atelier3d.serve import runner

    config = runner.load_serve_config(args.config, models=args.models, port=args.port)
    port = config.get("http_options", {}).get("port", 8000)
    host = config.get("http_options", {}).get("host", "127.0.0.1")
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
        runner.deploy(config)
        print(f"atelier3d is serving the UI and API on http://{host}:{port} (Ctrl-C stops)",
              flush=True)
        stop_event.wait()
    finally:
        print("shutting down Serve and Ray...", flush=True)
        runner.stop()
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from atelier3d.models import hunyuan3d, parsing
    from atelier3d.models.qwen_edit import tiny_edit_dir, tiny_lightning_dir
    from atelier3d.models.sam import RANDOM_VIT_B_NAME, tiny_checkpoint, write_random_checkpoint

    out = Path(args.dir)
    tiny = tiny_checkpoint(out)
    print(f"SAM tiny ({tiny.model_type}): {tiny.path}")
    print(f"SegFormer tiny (ATR 18): {parsing.tiny_segformer_dir(out)}")
    print(f"Qwen-Image-Edit tiny (diffusers layout): {tiny_edit_dir(out)}")
    print(f"Qwen-Image-Edit-2509 tiny (diffusers layout): {tiny_edit_dir(out, plus=True)}")
    print(f"Qwen-Image-Lightning tiny (its edit LoRA files): {tiny_lightning_dir(out)}")
    shape = hunyuan3d.tiny_shape3d_dir(out) / hunyuan3d.TINY_SUBFOLDER
    print(f"Hunyuan3D tiny (hy3dgen layout): {shape}")
    if args.full_size:
        path = write_random_checkpoint(out / "sam" / RANDOM_VIT_B_NAME, "vit_b")
        print(f"SAM vit_b, random weights: {path}")
        path = parsing.write_random_segformer_b2(out / "parsing" / parsing.B2_DIR)
        print(f"SegFormer B2, random weights: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atelier3d", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start a local Ray and serve the UI + API")
    serve.add_argument("--config", help="Serve YAML (default: the packaged local.yaml)")
    serve.add_argument("--models", choices=["auto", "tiny", "real"], default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--num-cpus", type=float, default=None, help="logical CPUs for Ray")
    serve.add_argument("--num-gpus", type=float, default=None, help="logical GPUs for Ray")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="Prometheus metrics port (Ray's metrics agent; default: Ray's choice)")
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="model weights")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    tiny = models_sub.add_parser("make-tiny", help="write tiny random checkpoints (tests)")
    tiny.add_argument("--dir", required=True)
    tiny.add_argument("--full-size", action="store_true",
                      help="also write full-size vit_b and SegFormer-B2 with random weights "
                           "(benchmarks)")
    tiny.set_defaults(func=cmd_make_tiny)

    from atelier3d.clients.cli import add_client_commands

    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
