"""Client-side CLI commands (``atelier3d segment``...), talking HTTP to a running server."""

from __future__ import annotations

import argparse


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Registers the stage commands; filled in with the client."""
