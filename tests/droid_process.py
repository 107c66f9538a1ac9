"""Real `python -m droid` child processes for tests: `DroidProcess`, and the `spawn` fixture that
starts them and SIGKILLs every one at the end (printing its log, which pytest shows when the test
fails)."""
from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

import droid
from conftest import Listener
from redis_server import die_with_parent, free_port

ROOT = Path(droid.__file__).resolve().parent.parent
# Everything that configures Droid is taken out of the inherited environment: each process
# gets exactly what its test gives it.
_SCRUB_PREFIXES = ("MONGODB_", "LLM_", "REDIS_", "JWT_", "DROID_", "WORKER_", "TASK_", "CORS_",
                   "METRICS_")
_SCRUB_NAMES = ("HOST", "PORT", "LOG_LEVEL")


class DroidProcess:
    """`python -m droid` in `workdir` on a free port, with only HOST, PORT and `env` set; its
    output (stdout and stderr) kept in a file of the test's folder."""

    def __init__(self, name: str, workdir: Path, logdir: Path, env: dict[str, str],
                 port: int | None = None, *, nofile: tuple[int, int] | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        full = {k: v for k, v in os.environ.items()
                if not k.startswith(_SCRUB_PREFIXES) and k not in _SCRUB_NAMES}
        full.update(HOST="127.0.0.1", PORT=str(self.port), PYTHONPATH=str(ROOT))
        full.update({k: str(v) for k, v in env.items()})
        self.log_path = logdir / f"{name}.log"
        workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # The working directory is the test's own: no stray .env is read, and the default
            # data folder (droid-data/) lands there.
            self.proc = subprocess.Popen([sys.executable, "-m", "droid"], cwd=workdir, env=full,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         preexec_fn=_preexec(nofile))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def ready(self, timeout: float = 30.0) -> "DroidProcess":
        """Wait until /health answers 200 (fails with the process's output otherwise)."""
        http = AsyncHTTPClient(force_instance=True)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                assert self.proc.poll() is None, f"{self.name} exited:\n{self.output()}"
                try:
                    reply = await http.fetch(self.url + "/health", request_timeout=2,
                                             raise_error=False)
                    if reply.code == 200:
                        return self
                except (OSError, HTTPClientError):
                    pass  # not listening yet, or too busy starting to answer within 2 s
                assert asyncio.get_running_loop().time() < deadline, \
                    f"{self.name} did not start:\n{self.output()}"
                await asyncio.sleep(0.05)
        finally:
            http.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def _preexec(nofile: tuple[int, int] | None) -> Callable[[], None] | None:
    """The child's preexec_fn: die with this process, and with `nofile` (soft, hard) as its
    RLIMIT_NOFILE (`ulimit -n`)."""
    dies = die_with_parent()
    if nofile is None:
        return dies

    def preexec() -> None:
        if dies is not None:
            dies()
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
    return preexec


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., DroidProcess]]:
    """Start `python -m droid` processes: spawn(name, workdir=None, port=None, nofile=None,
    **env) (`port`: the one of a process stopped before, to restart it where its clients look;
    `nofile`: its (soft, hard) descriptor limit). Every one of them is SIGKILLed at the end (also
    when the test fails) and its log printed."""
    started: list[DroidProcess] = []

    def start(name: str, workdir: Path | None = None, port: int | None = None, *,
              nofile: tuple[int, int] | None = None, **env: Any) -> DroidProcess:
        assert name not in {p.name for p in started}, "one log per process: give a new name"
        proc = DroidProcess(name, workdir or tmp_path / "work", tmp_path, env, port,
                            nofile=nofile)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()
        for proc in started:
            print(f"--- {proc.name} (port {proc.port}, exit {proc.proc.returncode}) ---\n"
                  f"{proc.output()}")


def task_envelopes(listener: Listener, task_id: str, name: str = "task.event") -> list[dict]:
    """The task's stored envelopes the listener received as `name` (live progress left out)."""
    return [e for e in listener.of(name)
            if e["data"]["taskId"] == task_id and e["event"] != "task.progress"]
