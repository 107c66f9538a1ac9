"""A restart keeps what a person notices: a real `python -m droid`, stopped and started again.

The first test gives the process nothing but HOST and PORT (no JWT_SECRET, no MONGODB_URI, no
DROID_DATA_DIR), in a working directory of its own: it must store in `droid-data/` there, say
so first thing, and after a restart in the same folder still know its users (and accept their
old tokens: the generated key is kept there too), their tasks and their events.
"""
from __future__ import annotations

import pytest

from conftest import Api
from droid_process import spawn, task_envelopes  # noqa: F401 - spawn is a fixture

pytestmark = pytest.mark.asyncio

LEASE_S = 2.0


async def test_a_restart_keeps_users_tokens_tasks_and_events(tmp_path, spawn, listen):
    workdir = tmp_path / "fresh"
    first = await spawn("first", workdir).ready()
    data = workdir / "droid-data"
    head = first.output().splitlines()[:3]
    assert any(f"storing data in SQLite at {data / 'droid.sqlite3'}" in line for line in head), head
    assert "kept in droid-data/jwt-secret" in first.output(), first.output()

    api = Api(first.url)
    try:
        user = await api.register(password="correct horse battery")
        sock = await listen(first.url, user["token"])
        await sock.next("connected")
        ids = []
        for n in range(3):
            reply = await api.post("/tasks", {"prompt": f"remember me #{n}", "priority": "high"},
                                   token=user["token"])
            assert reply.status == 201, reply.body
            ids.append(reply.body["id"])
        # The default demo agent takes 1.5 s an answer; wait for every answer.
        await sock.wait_for(lambda: {e["data"]["taskId"] for e in sock.of("task.event")
                                     if e["event"] == "task.completed"} >= set(ids), timeout=30)
        tasks_before = (await api.get("/tasks?limit=100", token=user["token"])).body["items"]
        events_before = (await api.get("/events?after=0", token=user["token"])).body
        assert len(events_before["items"]) == 9 and events_before["lastSeq"] == 9, events_before
        await sock.close()
    finally:
        api.close()
    assert first.terminate() == 0, first.output()
    assert (data / "droid.sqlite3").is_file() and (data / "jwt-secret").is_file()

    second = await spawn("second", workdir).ready()
    api = Api(second.url)
    try:
        # The old token still works (the key was kept), and the password signs in again.
        listed = (await api.get("/tasks?limit=100", token=user["token"])).body["items"]
        assert listed == tasks_before
        login = await api.post("/auth/login", {"email": user["email"],
                                               "password": "correct horse battery"})
        assert login.status == 200, login.body
        token = login.body["accessToken"]
        assert login.body["user"]["id"] == user["id"]
        assert [t["id"] for t in tasks_before] == ids[::-1]
        assert all(t["status"] == "completed" for t in tasks_before), tasks_before
        for task_id in ids:
            task = await api.get(f"/tasks/{task_id}", token=token)
            assert task.status == 200 and task.body["status"] == "completed", task.body
        assert (await api.get("/events?after=0", token=token)).body == events_before
        # Numbering goes on where it stopped: the next task's first envelope is seq 10.
        sock = await listen(second.url, token, auth={"token": token, "lastSeq": 9})
        reply = await api.post("/tasks", {"prompt": "after the restart"}, token=token)
        assert reply.status == 201, reply.body
        created = await sock.next("task.created", timeout=10)
        assert created["seq"] == 10 and created["data"]["id"] == reply.body["id"], created
    finally:
        api.close()
    assert second.terminate() == 0, second.output()


async def test_a_task_left_processing_by_a_killed_process_is_taken_up_after_a_restart(
        tmp_path, spawn, listen):
    workdir = tmp_path / "crash"
    env = {"DROID_LEASE_S": LEASE_S, "DROID_RETRY_BACKOFF_S": "0.05"}
    first = await spawn("first", workdir, DROID_DEMO_DELAY_S="60", **env).ready()
    api = Api(first.url)
    try:
        user = await api.register()
        sock = await listen(first.url, user["token"])
        await sock.next("connected")
        reply = await api.post("/tasks", {"prompt": "interrupted"}, token=user["token"])
        assert reply.status == 201, reply.body
        task_id = reply.body["id"]
        await sock.next("task.processing", timeout=10)
        await sock.close()
    finally:
        api.close()
    first.kill()

    second = await spawn("second", workdir, DROID_DEMO_DELAY_S="0.05", **env).ready()
    api = Api(second.url)
    try:
        # What the killed process published (created, processing) is stored; the rest comes
        # from the new one once the dead process's lease has run out.
        sock = await listen(second.url, user["token"], auth={"token": user["token"], "lastSeq": 2})
        await sock.wait_for(lambda: any(e["event"] == "task.completed"
                                        for e in task_envelopes(sock, task_id)),
                            timeout=LEASE_S + 15)
        envelopes = task_envelopes(sock, task_id)
        assert [e["event"] for e in envelopes] == ["task.pending", "task.processing",
                                                   "task.completed"], envelopes
        assert [e["seq"] for e in envelopes] == [3, 4, 5]
        assert envelopes[0]["data"]["retryCount"] == 1, envelopes[0]
        task = (await api.get(f"/tasks/{task_id}", token=user["token"])).body
        assert task["status"] == "completed" and task["retryCount"] == 1, task
        assert "lease of" in second.output() and "ran out" in second.output()
        stored = (await api.get("/events?after=0", token=user["token"])).body["items"]
        assert [e["event"] for e in stored] == ["task.created", "task.processing", "task.pending",
                                                "task.processing", "task.completed"], stored
    finally:
        api.close()
    assert second.terminate() == 0, second.output()
