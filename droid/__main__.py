"""`python -m droid` and the `droid` command. With no arguments, options only (`--help`,
`--version`) or `serve`, it serves (droid/serving.py, as the Procfile's `python -m droid`
does); with a command (`droid run`, `droid tasks`, ...) it is the command line (droid/cli/),
which loads nothing of the server."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "serve":
        from .serving import main as serve

        serve(args[1:], prog="droid serve")
    elif args and not args[0].startswith("-"):
        from .cli import main as cli

        cli(args)
    else:
        from .serving import main as serve

        serve(args)


if __name__ == "__main__":
    main()
