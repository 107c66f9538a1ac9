"""Two real `python -m droid` processes sharing JWT_SECRET and REDIS_URL, nothing else.

Each process has its own embedded database (its own DROID_DATA_DIR), so whatever one of them
learns about the other's tasks and sockets came through Redis. Redis is a real redis-server
started by the test.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import TEST_SECRET, Api
from droid_process import spawn  # noqa: F401 - a fixture
from redis_server import RedisServer, redis_server  # noqa: F401 - a fixture
from test_cluster import counts, finished, require_ttl_setting, settle_count

pytestmark = pytest.mark.asyncio

TTL_S = 3.0                      # DROID_PRESENCE_TTL_S of both processes
BOUND_S = TTL_S + TTL_S / 3      # a killed process stops being counted within this
SLACK_S = 1.0


def cluster_env(tmp_path: Path, redis: RedisServer, name: str) -> dict[str, str]:
    """JWT_SECRET and REDIS_URL shared; a data folder of the process's own."""
    return {"JWT_SECRET": TEST_SECRET, "REDIS_URL": redis.url,
            "DROID_PRESENCE_TTL_S": str(TTL_S), "DROID_DEMO_DELAY_S": "0.05",
            "LOG_LEVEL": "INFO", "DROID_DATA_DIR": str(tmp_path / f"{name}-data")}


async def test_two_processes_share_events_and_counts_and_forget_a_killed_one(
        redis_server, tmp_path, listen, spawn):
    require_ttl_setting()
    a = spawn("a", **cluster_env(tmp_path, redis_server, "a"))
    b = spawn("b", **cluster_env(tmp_path, redis_server, "b"))
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
