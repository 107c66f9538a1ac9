"""Droid's command line (`droid login`, `run`, `tasks`, `tail`, `keys`, `webhooks`), on click
and rich, over `droid.client`: it imports nothing of the server."""
from __future__ import annotations

from typing import NoReturn

from . import commands, run  # noqa: F401  (they add their commands to the group)
from .app import cli, run_cli


def main(args: list[str]) -> NoReturn:
    """Run `droid ARGS` (a command); exits with the command's code."""
    run_cli(args)


__all__ = ["cli", "main"]
