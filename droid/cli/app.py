"""The `droid` command group, the options every command shares, the exit codes, and how a
failure becomes one line on stderr."""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any, Callable, NoReturn

import click

from .. import __version__
from ..client import Client
from ..client import errors as e
from . import config as saved
from .output import Output

# Exit codes (README, "Command line"): distinct, so that scripts can tell what happened.
OK = 0
TASK_FAILED = 1
USAGE = 2             # click's own code for a bad option or argument
TASK_CANCELLED = 3
AUTH = 4              # not logged in, invalid/revoked key, expired token, scope refused
NOT_FOUND = 5
CONFLICT = 6
REFUSED = 7           # any other refusal: 400, 413, 429 after retries, 5xx
UNREACHABLE = 8       # no answer: connection refused, unknown host, timeout
INTERRUPTED = 130     # Ctrl-C


class CliError(click.ClickException):
    """A one-line failure with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]

    def show(self, file: Any = None) -> None:
        click.echo(f"droid: {self.format_message()}", err=True)


def fail(message: str, code: int) -> NoReturn:
    raise CliError(message, code)


def exit_code_of(exc: e.DroidError) -> int:
    if isinstance(exc, (e.Unauthorized, e.Forbidden)):
        return AUTH
    if isinstance(exc, e.NotFound):
        return NOT_FOUND
    if isinstance(exc, e.Conflict):
        return CONFLICT
    if isinstance(exc, e.ApiError):
        return REFUSED
    return UNREACHABLE  # ConnectionFailed, Timeout


def explain(exc: e.DroidError, url: str) -> str:
    """The one line shown for a client error."""
    if isinstance(exc, e.Unauthorized):
        return (f"{exc.text} ({url}): log in again with `droid login`, or set DROID_API_KEY")
    if isinstance(exc, e.RateLimited) and exc.retry_after is not None:
        return f"{exc.text} (retry in {exc.retry_after:g} s)"
    if isinstance(exc, e.ApiError):
        return exc.text
    return str(exc)


@dataclasses.dataclass
class Context:
    """What a command was given: where, with which key, and how to write."""

    url: str | None
    api_key: str | None
    out: Output

    def client(self, *, need_key: bool = True, **kw: Any) -> Client:
        """A client for the configured server: --url / DROID_URL, else what `droid login`
        saved; --api-key / DROID_API_KEY, else the saved key."""
        stored = saved.load()
        url = self.url or stored.get("url")
        # The saved key goes only to the server it was made for.
        same_server = not self.url or self.url.rstrip("/") == stored.get("url")
        key = self.api_key or (stored.get("apiKey") if same_server else None)
        if need_key and not key:
            fail("not logged in: run `droid login` (or set DROID_API_KEY)", AUTH)
        try:
            return Client(url, key, **kw)
        except ValueError as exc:
            fail(str(exc), USAGE)


def common(func: Callable[..., Any]) -> Callable[..., Any]:
    """--url, --api-key and --json on a command; the command gets a `Context` first."""

    @click.option("--json", "json_mode", is_flag=True,
                  help="Write one JSON object per line (for scripts).")
    @click.option("--api-key", envvar="DROID_API_KEY", metavar="KEY", show_envvar=True,
                  help="API key to use instead of the one `droid login` saved.")
    @click.option("--url", envvar="DROID_URL", metavar="URL", show_envvar=True,
                  help="Droid server (default: the one `droid login` saved, else "
                       "http://localhost:3000).")
    @functools.wraps(func)
    def wrapper(*args: Any, url: str | None, api_key: str | None, json_mode: bool,
                **kwargs: Any) -> Any:
        ctx = Context(url, api_key, Output(json_mode))
        try:
            return func(ctx, *args, **kwargs)
        except e.DroidError as exc:
            where = url or saved.load().get("url") or "the server"
            fail(explain(exc, where), exit_code_of(exc))
        except saved.ConfigFileError as exc:
            fail(str(exc), USAGE)

    return wrapper


HELP = """Droid's command line: run tasks, follow your events, manage API keys and webhooks.

With no command (or `droid serve`), Droid serves: see `droid --help` and `droid serve --help`.
Start with `droid login`. Every command has --help.

\b
Exit codes: 0 ok, 1 the task failed, 2 bad usage, 3 the task was cancelled,
4 not logged in or the key was refused, 5 not found, 6 conflict, 7 other refusal
by the server, 8 the server could not be reached, 130 interrupted (Ctrl-C)."""


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="droid",
                      message="%(prog)s %(version)s")
def cli() -> None:
    pass


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                               "help_option_names": []}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args: tuple[str, ...]) -> None:
    """Serve Droid (the REST API, Socket.IO and the page): what `droid` alone does."""
    from ..serving import main as serve_main

    serve_main(list(args), prog="droid serve")


def run_cli(args: list[str]) -> NoReturn:
    """Run a command; exits with its code (130 on Ctrl-C, one line on stderr for errors)."""
    try:
        code = cli.main(args, prog_name="droid", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("", err=True)
        code = INTERRUPTED
    except KeyboardInterrupt:
        click.echo("", err=True)
        code = INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except BrokenPipeError:  # `droid tasks ls | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = OK
    sys.exit(code if isinstance(code, int) else OK)
