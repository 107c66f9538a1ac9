"""Agents and tasks over REST: validation, isolation, pagination, cancel, idempotency."""
import asyncio
import re

import pytest
import pytest_asyncio

from conftest import ISO_RE, Api

pytestmark = pytest.mark.asyncio

TASK_FIELDS = {"id", "userId", "agentId", "status", "priority", "prompt", "response", "error",
               "tokensUsed", "executionTimeMs", "retryCount", "metadata", "createdAt",
               "updatedAt", "startedAt", "completedAt"}


@pytest_asyncio.fixture
async def idle(droid_factory):
    """A Droid without a worker: tasks stay pending."""
    app = await droid_factory(WORKER_CONCURRENCY=0)
    api = Api(app.url)
    yield app, api
    api.close()


async def test_agents_lists_the_default_agent_and_the_callers_own(idle):
    _, api = idle
    alice, bob = await api.register(), await api.register()
    agents = await api.get("/agents", token=alice["token"])
    assert agents.status == 200 and len(agents.body) == 1
    default = agents.body[0]
    assert default["ownerId"] is None and default["name"]
    created = await api.post("/agents", {"name": "Poet", "model": "gpt-4o-mini",
                                         "systemPrompt": "Answer in verse."}, token=alice["token"])
    assert created.status == 201
    assert set(created.body) == {"id", "name", "description", "model", "systemPrompt", "ownerId",
                                 "createdAt"}
    assert created.body["ownerId"] == alice["id"] and re.match(ISO_RE, created.body["createdAt"])
    mine = await api.get("/agents", token=alice["token"])
    assert [a["name"] for a in mine.body] == [default["name"], "Poet"]
    theirs = await api.get("/agents", token=bob["token"])
    assert [a["id"] for a in theirs.body] == [default["id"]]
    # Bob cannot run a task on Alice's agent: it does not exist for him.
    reply = await api.post("/tasks", {"prompt": "hi", "agentId": created.body["id"]}, token=bob["token"])
    assert reply.status == 404 and reply.body["message"] == "Agent not found"
    bad = await api.post("/agents", {"name": ""}, token=alice["token"])
    assert bad.status == 400


async def test_create_task_returns_the_whole_task(idle):
    _, api = idle
    user = await api.register()
    reply = await api.post("/tasks", {"prompt": "Write a haiku", "priority": "high",
                                      "metadata": {"source": "test", "n": [1, 2]}}, token=user["token"])
    assert reply.status == 201
    task = reply.body
    assert set(task) == TASK_FIELDS
    assert task["status"] == "pending" and task["priority"] == "high" and task["retryCount"] == 0
    assert task["userId"] == user["id"] and task["metadata"] == {"source": "test", "n": [1, 2]}
    assert task["response"] is None and task["startedAt"] is None and task["completedAt"] is None
    assert re.match(ISO_RE, task["createdAt"]) and task["createdAt"] == task["updatedAt"]
    again = await api.get(f"/tasks/{task['id']}", token=user["token"])
    assert again.status == 200 and again.body == task
    default_priority = await api.post("/tasks", {"prompt": "x"}, token=user["token"])
    assert default_priority.body["priority"] == "normal"


@pytest.mark.parametrize("body, fragment", [
    ({}, "prompt is required"),
    ({"prompt": ""}, "prompt must be a non-empty string"),
    ({"prompt": "   "}, "prompt must be a non-empty string"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": ["a"]}, "prompt"),
    ({"prompt": {"$gt": ""}}, "prompt"),
    ({"prompt": "x" * 32001}, "prompt"),
    ({"prompt": "ok", "priority": "critical"}, "priority must be one of low, normal, high or urgent"),
    ({"prompt": "ok", "priority": 3}, "priority"),
    ({"prompt": "ok", "metadata": "nope"}, "metadata"),
    ({"prompt": "ok", "agentId": 7}, "agentId"),
])
async def test_invalid_task_bodies_are_400_with_a_clear_message(idle, body, fragment):
    _, api = idle
    user = await api.register()
    reply = await api.post("/tasks", body, token=user["token"])
    assert reply.status == 400, reply.body
    assert reply.body["statusCode"] == 400 and reply.body["error"] == "Bad Request"
    messages = reply.body["message"]
    assert any(fragment in m for m in (messages if isinstance(messages, list) else [messages]))


async def test_metadata_keys_may_be_anything_both_databases_hold(idle):
    # NUL and a leading $ are refused (tests/test_hardening.py): MongoDB cannot hold the first,
    # and reads `$ref`/`$id` objects back as DBRefs.
    _, api = idle
    user = await api.register()
    metadata = {"where": "1", "a.b": {"": [1, {"gt$": "\u0000"}]}, "deep": [[[[[[[[[1]]]]]]]]]}
    reply = await api.post("/tasks", {"prompt": "ok", "metadata": metadata}, token=user["token"])
    assert reply.status == 201 and reply.body["metadata"] == metadata
    again = await api.get(f"/tasks/{reply.body['id']}", token=user["token"])
    assert again.body["metadata"] == metadata


async def test_a_prompt_of_exactly_32000_characters_is_accepted(idle):
    _, api = idle
    user = await api.register()
    reply = await api.post("/tasks", {"prompt": "é" * 32000}, token=user["token"])
    assert reply.status == 201 and len(reply.body["prompt"]) == 32000


@pytest.mark.parametrize("raw, message", [
    (b"{not json", "Request body is not valid JSON"),
    (b"[1, 2]", "Request body must be a JSON object"),
    (b"", "Request body must be a JSON object"),
    (b"\xff\xfe", "Request body is not valid JSON"),
])
async def test_malformed_json_is_400(idle, raw, message):
    _, api = idle
    user = await api.register()
    reply = await api.post("/tasks", raw=raw, token=user["token"])
    assert reply.status == 400 and reply.body["message"] == message


async def test_another_users_task_is_404_never_403(idle):
    _, api = idle
    alice, bob = await api.register(), await api.register()
    task = (await api.post("/tasks", {"prompt": "private"}, token=alice["token"])).body
    for reply in (await api.get(f"/tasks/{task['id']}", token=bob["token"]),
                  await api.post(f"/tasks/{task['id']}/cancel", token=bob["token"]),
                  await api.get("/tasks/does-not-exist", token=alice["token"])):
        assert reply.status == 404 and reply.body == {"statusCode": 404, "error": "Not Found",
                                                      "message": "Task not found"}
    listed = await api.get("/tasks", token=bob["token"])
    assert listed.body == {"items": [], "nextCursor": None}
    still = await api.get(f"/tasks/{task['id']}", token=alice["token"])
    assert still.body["status"] == "pending"


async def test_pagination_is_newest_first_without_overlap(idle):
    _, api = idle
    user = await api.register()
    created = []
    for i in range(25):
        created.append((await api.post("/tasks", {"prompt": f"task {i}"}, token=user["token"])).body["id"])
    seen, cursor, pages = [], None, 0
    while True:
        path = "/tasks?limit=7" + (f"&cursor={cursor}" if cursor else "")
        page = await api.get(path, token=user["token"])
        assert page.status == 200 and len(page.body["items"]) <= 7
        seen += [t["id"] for t in page.body["items"]]
        pages += 1
        cursor = page.body["nextCursor"]
        if cursor is None:
            break
    assert pages == 4
    assert seen == list(reversed(created))
    default = await api.get("/tasks", token=user["token"])
    assert len(default.body["items"]) == 20


async def test_list_filters_by_status_and_agent(idle):
    _, api = idle
    user = await api.register()
    a = (await api.post("/tasks", {"prompt": "a"}, token=user["token"])).body
    await api.post("/tasks", {"prompt": "b"}, token=user["token"])
    await api.post(f"/tasks/{a['id']}/cancel", token=user["token"])
    cancelled = await api.get("/tasks?status=cancelled", token=user["token"])
    assert [t["id"] for t in cancelled.body["items"]] == [a["id"]]
    by_agent = await api.get(f"/tasks?agentId={a['agentId']}", token=user["token"])
    assert len(by_agent.body["items"]) == 2
    none = await api.get("/tasks?agentId=nope", token=user["token"])
    assert none.body["items"] == []


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "status=done",
                                   "cursor=%%%", "cursor=bm9wZQ"])
async def test_bad_list_queries_are_400(idle, query):
    _, api = idle
    user = await api.register()
    reply = await api.get(f"/tasks?{query}", token=user["token"])
    assert reply.status == 400 and reply.body["statusCode"] == 400


@pytest.mark.parametrize("query", ["cursor=%00%ff", "status=%ff", "agentId=%c3%28"])
async def test_a_query_that_is_not_utf8_is_a_400_naming_the_parameter(idle, query):
    _, api = idle
    user = await api.register()
    reply = await api.get(f"/tasks?{query}", token=user["token"])
    name = query.split("=")[0]
    assert reply.status == 400, reply.body
    assert reply.body["message"] == f"{name} is not valid UTF-8", reply.body


async def test_cancel_pending_task_then_cancel_again_is_409(idle):
    _, api = idle
    user = await api.register()
    task = (await api.post("/tasks", {"prompt": "x"}, token=user["token"])).body
    reply = await api.post(f"/tasks/{task['id']}/cancel", token=user["token"])
    assert reply.status == 200 and reply.body["status"] == "cancelled"
    assert reply.body["completedAt"] is not None
    again = await api.post(f"/tasks/{task['id']}/cancel", token=user["token"])
    assert again.status == 409 and again.body["error"] == "Conflict"
    assert again.body["message"] == "Task is already cancelled"


async def test_cancel_of_completed_task_is_409(droid, api):
    user = await api.register()
    task = (await api.post("/tasks", {"prompt": "quick"}, token=user["token"])).body
    for _ in range(250):
        current = (await api.get(f"/tasks/{task['id']}", token=user["token"])).body
        if current["status"] == "completed":
            break
        await asyncio.sleep(0.02)
    assert current["status"] == "completed"
    reply = await api.post(f"/tasks/{task['id']}/cancel", token=user["token"])
    assert reply.status == 409 and reply.body["message"] == "Task is already completed"


async def test_idempotency_key_returns_the_first_task(idle):
    _, api = idle
    alice, bob = await api.register(), await api.register()
    headers = {"Idempotency-Key": "order-42"}
    first = await api.post("/tasks", {"prompt": "once"}, token=alice["token"], headers=headers)
    again = await api.post("/tasks", {"prompt": "once"}, token=alice["token"], headers=headers)
    assert first.status == 201 and again.status == 200 and again.body["id"] == first.body["id"]
    other_user = await api.post("/tasks", {"prompt": "once"}, token=bob["token"], headers=headers)
    assert other_user.status == 201 and other_user.body["id"] != first.body["id"]
    listed = await api.get("/tasks", token=alice["token"])
    assert len(listed.body["items"]) == 1


async def test_concurrent_requests_with_one_key_create_one_task(idle):
    _, api = idle
    user = await api.register()
    headers = {"Idempotency-Key": "same"}
    replies = await asyncio.gather(*[
        api.post("/tasks", {"prompt": "race"}, token=user["token"], headers=headers)
        for _ in range(8)])
    assert sorted(r.status for r in replies) == [200] * 7 + [201]
    assert len({r.body["id"] for r in replies}) == 1
    assert len((await api.get("/tasks", token=user["token"])).body["items"]) == 1


async def test_errors_have_the_contracts_exact_shape(idle):
    _, api = idle
    user = await api.register()
    one = await api.post("/tasks", {"prompt": ""}, token=user["token"])
    assert one.body == {"statusCode": 400, "error": "Bad Request",
                        "message": "prompt must be a non-empty string"}
    several = await api.post("/tasks", {"prompt": 1, "priority": "x"}, token=user["token"])
    assert several.body["message"] == ["prompt must be a string",
                                       "priority must be one of low, normal, high or urgent"]
