"""DROID_EVENT_LOOP: `python -m droid` runs on uvloop by default, on asyncio's own loop when asked,
and says which at start-up; a value it cannot honour stops start-up with one line and exit 2.

The rest of the suite runs on uvloop (tests/conftest.py); this file runs a whole task, live on a
socket, over both loops, in real processes, so that the fallback is not untested."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import TEST_SECRET, Api
from droid_process import ROOT, spawn, task_envelopes  # noqa: F401 - spawn is a fixture

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("choice, expected", [
    (None, r"event loop: uvloop \d+\.\d+"),
    ("auto", r"event loop: uvloop \d+\.\d+"),
    ("uvloop", r"event loop: uvloop \d+\.\d+"),
    ("asyncio", r"event loop: asyncio$"),
    ("ASYNCIO ", r"event loop: asyncio$"),
])
async def test_a_task_runs_live_on_the_loop_chosen_and_the_log_says_which(
        tmp_path, spawn, listen, choice, expected):
    env = {"JWT_SECRET": TEST_SECRET, "DROID_DEMO_DELAY_S": "0.05",
           "DROID_DATA_DIR": str(tmp_path / "data")}
    if choice is not None:
        env["DROID_EVENT_LOOP"] = choice
    proc = await spawn("droid", **env).ready()
    assert re.search(expected, proc.output(), re.M), proc.output()
    api = Api(proc.url)
    try:
        user = await api.register()
        sock = await listen(proc.url, user["token"])
        await sock.next("connected")
        reply = await api.post("/tasks", {"prompt": "which loop?"}, token=user["token"])
        assert reply.status == 201, reply.body
        task_id = reply.body["id"]
        await sock.wait_for(lambda: any(e["event"] == "task.completed"
                                        for e in task_envelopes(sock, task_id)), timeout=20)
        assert [e["event"] for e in task_envelopes(sock, task_id)] == [
            "task.created", "task.processing", "task.completed"]
    finally:
        api.close()
    assert proc.terminate() == 0, proc.output()
    assert "stopped" in proc.output()


def run_droid(tmp_path, env: dict[str, str], pythonpath: str = str(ROOT)) -> subprocess.CompletedProcess:
    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath, "HOST": "127.0.0.1", "PORT": "0",
            "JWT_SECRET": TEST_SECRET, "DROID_DATA_DIR": str(tmp_path / "data"), **env}
    return subprocess.run([sys.executable, "-m", "droid"], cwd=tmp_path, env=full,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("value", ["libuv", "uv loop", "1", "tokio"])
async def test_an_unknown_loop_is_refused_with_one_line_naming_the_variable(tmp_path, value):
    done = run_droid(tmp_path, {"DROID_EVENT_LOOP": value})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"droid: configuration error: DROID_EVENT_LOOP must be auto, uvloop or asyncio, "
        f"got {value.strip().lower()!r}"]


async def test_without_uvloop_auto_falls_back_to_asyncio_and_uvloop_is_refused(tmp_path, spawn):
    # A uvloop that cannot be imported, as on a platform it does not build for.
    fake = tmp_path / "no-uvloop"
    fake.mkdir()
    (fake / "uvloop.py").write_text("raise ImportError('uvloop is not available here')\n")
    path = f"{fake}:{ROOT}"

    refused = run_droid(tmp_path, {"DROID_EVENT_LOOP": "uvloop"}, path)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "droid: configuration error: DROID_EVENT_LOOP=uvloop, but uvloop is not installed "
        "(pip install uvloop, or set DROID_EVENT_LOOP=asyncio)"]

    proc = await spawn("auto", PYTHONPATH=path, JWT_SECRET=TEST_SECRET,
                       DROID_DATA_DIR=str(tmp_path / "data")).ready()
    assert re.search(r"event loop: asyncio$", proc.output(), re.M), proc.output()
    assert proc.terminate() == 0, proc.output()
