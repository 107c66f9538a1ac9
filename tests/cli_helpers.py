"""Running the installed `droid` command as a user would: in a real pseudo-terminal (pexpect) or
piped, with its own config folder and no inherited Droid settings."""
from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pexpect

from conftest import TEST_SECRET
from droid.client import Client
from droid_process import DroidProcess

DROID = shutil.which("droid", path=os.path.dirname(sys.executable))
PASSWORD = "correct horse"
SERVER_ENV = {"JWT_SECRET": TEST_SECRET, "DROID_ENV": "test", "DROID_RETRY_BACKOFF_S": "0.05"}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[=>]")


def cli_env(tmp_path: Path, url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a `droid` command: a home and config folder of the test's own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DROID_", "XDG_", "NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES"))}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               TERM="xterm-256color", PYTHONUNBUFFERED="1")
    if url:
        env["DROID_URL"] = url
    env.update(extra)
    return env


def spawn_cli(args: list[str], env: dict[str, str], timeout: float = 30) -> pexpect.spawn:
    """`droid ARGS` in a pseudo-terminal of 100 x 30; everything it wrote is in `shown(child)`."""
    assert DROID, "the droid console script is not installed (pip install -e .)"
    child = pexpect.spawn(DROID, args, env=env, encoding="utf-8", timeout=timeout,
                          dimensions=(30, 100))
    child.logfile_read = io.StringIO()
    return child


def shown(child: pexpect.spawn) -> str:
    """All the command wrote to its terminal so far, as plain text."""
    return plain(child.logfile_read.getvalue())


def run_cli(args: list[str], env: dict[str, str], input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """`droid ARGS` piped (not a terminal)."""
    assert DROID, "the droid console script is not installed (pip install -e .)"
    return subprocess.run([DROID, *args], env=env, capture_output=True, text=True,
                          input=input, timeout=timeout)


def finish(child: pexpect.spawn) -> int:
    """Wait for the command to end; its exit code (or 128 + the signal that ended it)."""
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus if child.exitstatus is not None else 128 + child.signalstatus


def plain(text: str) -> str:
    """Terminal output without colours, cursor moves and carriage returns."""
    return _ANSI.sub("", text).replace("\r", "")


def register(url: str) -> dict[str, Any]:
    email = f"cli-{uuid.uuid4().hex[:10]}@example.com"
    with Client(url) as anonymous:
        reply = anonymous.auth.register(email, PASSWORD)
    return {**reply["user"], "token": reply["accessToken"], "email": email}


def start(spawn, name: str = "droid", **env: Any) -> DroidProcess:
    """A `python -m droid` of the `spawn` fixture, ready."""
    proc = spawn(name, **{**SERVER_ENV, **env})
    return asyncio.run(proc.ready())
