"""Two real `python -m droid` processes sharing JWT_SECRET and REDIS_URL, nothing else.

Each process has its own embedded database (its own DROID_DATA_DIR), so whatever one of them learns about the other's
tasks and sockets came through Redis. Redis is a real redis-server started by the test.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

import droid
from conftest import TEST_SECRET, Api
from redis_server import RedisServer, die_with_parent, free_port, redis_server  # noqa: F401
from test_cluster import counts, finished, require_ttl_setting, settle_count

pytestmark = pytest.mark.asyncio

ROOT = Path(droid.__file__).resolve().parent.parent
TTL_S = 3.0                      # DROID_PRESENCE_TTL_S of both processes
BOUND_S = TTL_S + TTL_S / 3      # a killed process stops being counted within this
SLACK_S = 1.0


class DroidProcess:
    """`python -m droid` on a free port, its output kept in a file."""

    def __init__(self, name: str, redis_url: str, workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MONGODB_", "LLM_", "REDIS_", "JWT_", "DROID_", "WORKER_"))}
        env.update(HOST="127.0.0.1", PORT=str(self.port), JWT_SECRET=TEST_SECRET,
                   REDIS_URL=redis_url, DROID_PRESENCE_TTL_S=str(TTL_S),
                   DROID_DEMO_DELAY_S="0.05", LOG_LEVEL="INFO", PYTHONPATH=str(ROOT),
                   DROID_DATA_DIR=str(workdir / f"{name}-data"))
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            # The working directory is the test's own: no stray .env is read.
            self.proc = subprocess.Popen([sys.executable, "-m", "droid"], cwd=workdir, env=env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait until /health answers (the process prints its own failure otherwise)."""
        http = AsyncHTTPClient(force_instance=True)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                assert self.proc.poll() is None, f"{self.name} exited:\n{self.output()}"
                try:
                    reply = await http.fetch(self.url + "/health", request_timeout=2,
                                             raise_error=False)
                    if reply.code == 200:
                        return
                except OSError:
                    pass  # not listening yet
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
        return self.proc.returncode


async def test_two_processes_share_events_and_counts_and_forget_a_killed_one(
        redis_server, tmp_path, listen):
    require_ttl_setting()
    a = DroidProcess("a", redis_server.url, tmp_path)
    b = DroidProcess("b", redis_server.url, tmp_path)
    api_a, api_b = Api(a.url), Api(b.url)
    try:
        await asyncio.gather(a.ready(), b.ready())
        for api in (api_a, api_b):
            assert (await api.get("/health")).body["redis"] == "ok"
        user = await api_a.register()  # a's database only; b trusts the token (same JWT_SECRET)
        sa = await listen(a.url, user["token"])
        await settle_count([sa], 1)
        sb = await listen(b.url, user["token"])
        await settle_count([sa, sb], 2)

        reply = await api_b.post("/tasks", {"prompt": "made on b"}, token=user["token"])
        assert reply.status == 201, reply.body
        envelopes = await finished(sa, reply.body["id"])
        assert [e["event"] for e in envelopes] == ["task.created", "task.processing",
                                                   "task.completed"]
        # The task exists in b's database only: a's socket heard of it through Redis.
        assert (await api_a.get(f"/tasks/{reply.body['id']}", token=user["token"])).status == 404

        b.kill()
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await sa.wait_for(lambda: counts(sa)[-1] == 1, timeout=BOUND_S + SLACK_S + 2)
        took = loop.time() - killed_at
        print(f"count corrected {took:.2f} s after SIGKILL (bound {BOUND_S:.1f} s)")
        assert took <= BOUND_S + SLACK_S, took
        assert (await api_a.get("/health")).body["redis"] == "ok"

        await sa.close()
        assert a.terminate() == 0, a.output()
    finally:
        api_a.close()
        api_b.close()
        a.kill()
        b.kill()
        print(f"--- a ---\n{a.output()}\n--- b ---\n{b.output()}")  # shown when the test fails
