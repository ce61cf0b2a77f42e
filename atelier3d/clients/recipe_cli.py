"""``atelier3d recipe`` (export a session) and ``atelier3d replay`` (replay a recipe on its image),
talking HTTP to a running server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from atelier3d.api.recipe import Recipe
from atelier3d.clients.cli import CliError, _follow, _run, _write
from atelier3d.clients.client import API_KEY_ENV, DEFAULT_BASE_URL, Client
from atelier3d.errors import validation_message


def read_recipe(path: Path) -> Recipe:
    """The recipe in ``path``, checked here first (exit status 2 when it is not one)."""
    if not path.is_file():
        raise CliError(f"no such recipe file: {path}", 2)
    try:
        return Recipe.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise CliError(f"{path} is not a recipe: {validation_message(exc.errors())}", 2) from None


def cmd_recipe(args: argparse.Namespace) -> int:
    def work() -> int:
        with Client(args.server, timeout=args.timeout, api_key=args.api_key) as client:
            recipe = client.export_recipe(args.session_id)
        _write(args.output, recipe.model_dump_json(exclude_none=True, indent=1).encode())
        return 0

    return _run(args, work)


def cmd_replay(args: argparse.Namespace) -> int:
    def work() -> int:
        recipe = read_recipe(args.recipe)
        if not args.image.is_file():
            raise CliError(f"no such image file: {args.image}", 2)
        with Client(args.server, timeout=args.timeout, api_key=args.api_key) as client:
            replayed = client.replay(recipe, args.image)
            print(f"session {replayed.session_id}")
            for mismatched in replayed.mismatched_masks:
                print(f"warning: object {mismatched}'s replayed mask differs from the recipe's")
            kinds = {job.job_id: job.kind for job in recipe.jobs}
            results = {}
            for recorded, job_id in replayed.jobs.items():
                _follow(client, client.get_job(job_id), kinds[recorded], args.quiet)
                if args.output_dir is not None:
                    suffix = ".png" if kinds[recorded] == "edit" else ".glb"
                    path = args.output_dir / f"{recorded}{suffix}"
                    _write(path, client.job_result(job_id))
                    results[recorded] = str(path)
        if args.output_dir is not None:
            summary = {**replayed.model_dump(), "results": results}
            _write(args.output_dir / "replay.json", json.dumps(summary, indent=1).encode())
        return 0

    return _run(args, work)


def _server_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--server", default=DEFAULT_BASE_URL,
                         help=f"base URL of the server (default {DEFAULT_BASE_URL})")
    command.add_argument("--api-key", default=None, metavar="KEY",
                         help=f"the server's API key (default ${API_KEY_ENV}, if set)")
    command.add_argument("--timeout", type=float, default=360.0, help="seconds per request")


def add_recipe_commands(sub: argparse._SubParsersAction) -> None:
    recipe = sub.add_parser("recipe", help="export a session as a JSON recipe",
                            description="Writes how a session's masks, parses, edits and meshes "
                            "were made, with the exact models, as JSON for `atelier3d replay`.")
    recipe.add_argument("session_id")
    recipe.add_argument("-o", "--output", type=Path, required=True, help="the recipe JSON file")
    _server_arguments(recipe)
    recipe.set_defaults(func=cmd_recipe)

    replay = sub.add_parser("replay", help="replay a recipe on its image",
                            description="Makes a new session of IMAGE, replays the recipe's "
                            "clicks and parses, runs its edits and meshes with the same seeds "
                            "and waits for them. Refused when the image or the server's models "
                            "are not the recipe's.")
    replay.add_argument("recipe", type=Path, help="a recipe JSON (from `atelier3d recipe`)")
    replay.add_argument("--image", type=Path, required=True, help="the recipe's image")
    replay.add_argument("-o", "--output-dir", type=Path, metavar="OUTDIR",
                        help="write each job's result (<recipe job id>.png/.glb) and replay.json")
    replay.add_argument("--quiet", action="store_true", help="no progress bars")
    _server_arguments(replay)
    replay.set_defaults(func=cmd_replay)
