"""Issue 14: bounded by bytes and by time, and nothing lost to odd input.

One section per finding of the outside attack, each against a real server (both stores where the
database matters): what a user may store, request bodies and heads, Engine.IO requests, slow
clients, token errors, log lines, proxies, static files, and login/registration rate limits.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from typing import Any, AsyncIterator

import jwt
import pytest
import pytest_asyncio
import tornado.testing

from conftest import TEST_SECRET, Api, make_config, wait_until
from droid.app import make_app
from droid.store.mongo import MongoStore
from droid.store.sqlite import SqliteStore

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture(params=["sqlite", "mongo"])
async def served(request, tmp_path) -> AsyncIterator[tuple[Any, Api]]:
    """A Droid on each store (MongoDB: SecantusDB or DROID_TEST_MONGODB_URI) and a client."""
    if request.param == "mongo":
        store: Any = MongoStore(request.getfixturevalue("mongo_uri"),
                                f"droid_test_{uuid.uuid4().hex[:12]}")
    else:
        store = SqliteStore(str(tmp_path / "droid.sqlite3"))
    await store.open()
    app = await make_app(make_config(DROID_DEMO_DELAY_S=0), store=store)
    sock, _ = tornado.testing.bind_unused_port()
    await app.start([sock])
    api = Api(app.url)
    try:
        yield app, api
    finally:
        api.close()
        await app.stop()
        if request.param == "mongo":
            await store.drop()
        await store.close()


def nested(levels: int) -> dict:
    """An object `levels` deep: {"a": {"a": ... 1}} (the outer object is level 1)."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


async def readable(api: Api, token: str) -> dict:
    """Everything of the user the REST API can list, asserting each answer is a 200."""
    tasks = await api.get("/tasks?limit=100", token=token)
    events = await api.get("/events?after=0&limit=1000", token=token)
    assert tasks.status == 200, tasks.body
    assert events.status == 200, events.body
    return {"tasks": tasks.body["items"], "events": events.body["items"]}


# 1. metadata depth and size ------------------------------------------------------------------

async def test_deep_or_large_metadata_is_400_and_the_user_stays_readable(served, listen):
    app, api = served
    user = await api.register()
    for levels in (33, 251, 252, 253, 254, 300, 1000):
        # Written by hand: JSON encoders refuse such depths too.
        raw = ('{"prompt": "p", "metadata": ' + '{"a": ' * levels + "1" + "}" * levels + "}")
        reply = await api.post("/tasks", raw=raw.encode(), token=user["token"])
        assert reply.status == 400, (levels, reply.status, reply.body)
        assert reply.message == "metadata must be nested at most 32 levels deep", reply.body
    deep_list: Any = [1]
    for _ in range(40):
        deep_list = [deep_list]
    reply = await api.post("/tasks", {"prompt": "p", "metadata": {"l": deep_list}},
                           token=user["token"])
    assert reply.status == 400 and "32 levels" in reply.message
    reply = await api.post("/tasks", {"prompt": "p", "metadata": {"x": "y" * 16_400}},
                           token=user["token"])
    assert reply.status == 400 and reply.message == "metadata must be at most 16384 bytes as JSON"
    assert await readable(api, user["token"]) == {"tasks": [], "events": []}

    # At the limits it is accepted, and readable everywhere: REST, the event log, live.
    sock = await listen(app.url, user["token"])
    await sock.next("connected")
    for metadata in (nested(32), {"x": "y" * (16 * 1024 - 8)}):
        reply = await api.post("/tasks", {"prompt": "p", "metadata": metadata},
                               token=user["token"])
        assert reply.status == 201, reply.body
        assert reply.body["metadata"] == metadata
        created = await sock.next("task.created",
                                  where=lambda d: d["data"]["id"] == reply.body["id"])
        assert created["data"]["metadata"] == metadata
    seen = await readable(api, user["token"])
    assert len(seen["tasks"]) == 2
    assert [e["data"]["metadata"] for e in seen["events"] if e["event"] == "task.created"] == \
        [nested(32), {"x": "y" * (16 * 1024 - 8)}]


# 2. keys and values a database cannot hold -----------------------------------------------------

@pytest.mark.parametrize("metadata, message", [
    ({"a\u0000b": 1}, "metadata keys must not contain NUL characters"),
    ({"ok": [{"\u0000": 1}]}, "metadata keys must not contain NUL characters"),
    ({"x": {"$ref": "tasks", "$id": 1}}, "metadata keys must not start with $"),
    ({"$where": "1"}, "metadata keys must not start with $"),
    ({"big": 2**63}, "metadata integers must fit in 64 bits (-2^63 to 2^63-1)"),
    ({"big": [18446744073709551615]}, "metadata integers must fit in 64 bits (-2^63 to 2^63-1)"),
])
async def test_metadata_a_database_cannot_hold_is_400(served, metadata, message):
    _, api = served
    user = await api.register()
    reply = await api.post("/tasks", {"prompt": "p", "metadata": metadata}, token=user["token"])
    assert reply.status == 400, reply.body
    assert reply.message == message
    assert await readable(api, user["token"]) == {"tasks": [], "events": []}


async def test_odd_but_storable_metadata_is_stored_published_and_readable(served, listen):
    """Whatever is accepted reaches the event log and the sockets, with no hole in `seq`."""
    app, api = served
    user = await api.register()
    sock = await listen(app.url, user["token"])
    await sock.next("connected")
    odd = [
        {"a.b": {"": "\u0000 in a value is fine", "ключ": "é😀"}},
        {"max": 2**63 - 1, "min": -2**63, "f": 1.5e308, "neg": -0.0},
        {"where": {"k": "$gt: a value may start with $"}, "t": True, "n": None},
    ]
    ids = []
    for metadata in odd:
        reply = await api.post("/tasks", {"prompt": "p\u0000q", "metadata": metadata},
                               token=user["token"])
        assert reply.status == 201, reply.body
        assert reply.body["metadata"] == metadata
        ids.append(reply.body["id"])
    for task_id, metadata in zip(ids, odd):
        created = await sock.next("task.created", where=lambda d, i=task_id: d["data"]["id"] == i)
        assert created["data"]["metadata"] == metadata
        final = await sock.next("task.completed",
                                where=lambda d, i=task_id: d["data"]["taskId"] == i)
        assert final["seq"] > created["seq"]
    seen = await readable(api, user["token"])
    seqs = [e["seq"] for e in seen["events"]]
    assert seqs == list(range(1, len(seqs) + 1))  # every envelope was stored: no hole
    stored = {e["data"]["id"]: e["data"]["metadata"] for e in seen["events"]
              if e["event"] == "task.created"}
    assert stored == dict(zip(ids, odd))
    assert {t["id"]: t["metadata"] for t in seen["tasks"]} == dict(zip(ids, odd))


# raw HTTP ---------------------------------------------------------------------------------------

class Raw:
    """One raw TCP connection to the server, to send what HTTP clients will not."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Raw":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, timeout: float = 10) -> tuple[int, dict, bytes]:
        """The next response: status, headers (lower-case names), body."""
        async def read() -> tuple[int, dict, bytes]:
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            lines = head.split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
            return status, headers, body
        return await asyncio.wait_for(read(), timeout)

    async def closed_by_server(self, timeout: float) -> bool:
        """True when the server closes the connection (EOF or reset) within `timeout`."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except asyncio.TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def chunked(total: int, piece: int = 64 * 1024) -> bytes:
    out, sent = [], 0
    while sent < total:
        size = min(piece, total - sent)
        out.append(b"%x\r\n" % size + b"{" * size + b"\r\n")
        sent += size
    return b"".join(out) + b"0\r\n\r\n"


def no_errors(caplog) -> None:
    """Nothing at ERROR and no traceback from any logger (but python-engineio's one line, once
    per process, about a request for a session that is over, which the tests make on purpose)."""
    bad = [r for r in caplog.records if (r.levelno >= logging.ERROR or r.exc_info)
           and not r.getMessage().startswith("Invalid session")]
    assert not bad, [(r.name, r.getMessage()) for r in bad]


# 3. request bodies over 1 MiB ------------------------------------------------------------------

@pytest.mark.parametrize("size", [1024 * 1024 + 1, 3 * 1024 * 1024, 20 * 1024 * 1024])
async def test_a_chunked_body_over_1_mib_is_a_413_in_the_error_shape(droid, api, caplog, size):
    user = await api.register()
    raw = await Raw.open(droid.port)
    raw.send(b"POST /tasks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
             b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\n\r\n"
             % user["token"].encode())
    raw.send(chunked(size))
    status, headers, body = await raw.response(timeout=30)
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"statusCode": 413, "error": "Payload Too Large",
                                "message": "Request body is larger than 1048576 bytes"}
    if size <= 16 * 1024 * 1024:  # read to its end: the connection is still good
        raw.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await raw.response())[0] == 200
    await raw.close()
    no_errors(caplog)
    assert (await api.get("/tasks", token=user["token"])).body["items"] == []


async def test_a_body_over_1_mib_with_content_length_is_a_413_too(droid, api, caplog):
    user = await api.register()
    for expect in (b"", b"Expect: 100-continue\r\n"):
        raw = await Raw.open(droid.port)
        raw.send(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n" + expect +
                 b"Authorization: Bearer %s\r\n\r\n" % user["token"].encode())
        if not expect:
            raw.send(b"{" * 2097152)
        status, _, body = await raw.response()
        assert status == 413 and json.loads(body)["statusCode"] == 413
        await raw.close()
    no_errors(caplog)


# 4 and 7. Engine.IO long-polling requests are always answered -----------------------------------

class Polling:
    """Long-polling requests over Tornado's HTTP client."""

    def __init__(self, droid) -> None:
        from tornado.httpclient import AsyncHTTPClient
        self.http = AsyncHTTPClient(force_instance=True)
        self.base = droid.url + "/socket.io/?EIO=4&transport=polling"

    async def fetch(self, query: str = "", body: bytes | None = None, timeout: float = 10,
                    headers: dict | None = None):
        from tornado.httpclient import HTTPRequest
        return await self.http.fetch(HTTPRequest(
            self.base + query, method="GET" if body is None else "POST", body=body,
            headers=headers, request_timeout=timeout), raise_error=False)

    async def open(self) -> str:
        reply = await self.fetch()
        return re.search(r'"sid":"([^"]+)"', reply.body.decode()).group(1)

    def close(self) -> None:
        self.http.close()


@pytest.mark.parametrize("body, status", [
    (b"4" + b"x" * 100_000, 413),                                  # over 64 KiB
    (b'40/events,{"token":"' + b"t" * 100_000 + b'"}', 413),       # a 100 KB auth.token
    (b"2", 400), (b"6", 400), (b"9", 400), (b"", 200),             # PING, NOOP, no such type
    (b"\x1e".join([b"3"] * 20), 400),                              # more packets than allowed
    (b"\xff\xfe", 400), (b"d=4abc", 400), (b"4{\"a\": 1}", 400),   # not UTF-8, JSONP, not text
    (b"b4AAA", 400),                                               # binary
])
async def test_every_long_polling_post_is_answered(droid, caplog, body, status):
    polling = Polling(droid)
    sid = await polling.open()
    reply = await polling.fetch(f"&sid={sid}", body, timeout=5)
    assert reply.code == status, (reply.code, reply.body[:200])
    if status != 200:
        assert json.loads(reply.body)["statusCode"] == status
        # ... and the session is over: nothing is held for it any more.
        assert sid not in droid.sio.eio.sockets
        assert (await polling.fetch(f"&sid={sid}", timeout=5)).code == 400
    polling.close()
    no_errors(caplog)


async def test_a_hundred_oversized_polling_posts_hold_nothing(droid):
    """Issue 14: 100 such POSTs, no token needed, held 100 file descriptors."""
    polling = Polling(droid)
    sids = [await polling.open() for _ in range(100)]
    replies = await asyncio.gather(*(polling.fetch(f"&sid={sid}", b"4" + b"x" * 70_000, 10)
                                     for sid in sids))
    assert [r.code for r in replies] == [413] * 100
    assert not set(sids) & set(droid.sio.eio.sockets)
    polling.close()


async def test_a_chunked_polling_post_over_64_kib_is_a_413(droid, caplog):
    polling = Polling(droid)
    sid = await polling.open()
    raw = await Raw.open(droid.port)
    raw.send(f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\n\r\n".encode() + chunked(200_000))
    status, _, body = await raw.response()
    assert status == 413 and json.loads(body)["statusCode"] == 413
    assert sid not in droid.sio.eio.sockets
    await raw.close()
    polling.close()
    no_errors(caplog)


async def test_a_100_kb_bearer_token_is_a_431_not_a_reset(droid, api):
    token = "x" * 100_000
    for path in ("/auth/me", "/events/stream", "/socket.io/?EIO=4&transport=polling"):
        reply = await api.get(path, headers={"Authorization": f"Bearer {token}"})
        assert reply.status == 431, (path, reply.status)
        assert reply.body == {"statusCode": 431, "error": "Request Header Fields Too Large",
                              "message": "Request line and headers must be at most 65536 bytes"}
    reply = await api.get(f"/auth/me?token={token}")
    assert reply.status == 431
    # A head far beyond any limit is not read without end either: the connection is closed.
    raw = await Raw.open(droid.port)
    raw.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 400_000)
    assert await raw.closed_by_server(timeout=5)
    await raw.close()
    assert (await api.get("/health")).status == 200


# 5. slow clients are bounded in time ----------------------------------------------------------

async def test_slow_heads_slow_bodies_and_idle_connections_are_closed(droid_factory):
    app = await droid_factory(DROID_HEADER_TIMEOUT_S=0.5, DROID_BODY_TIMEOUT_S=0.5)
    partial = [await Raw.open(app.port) for _ in range(20)]
    for raw in partial:
        raw.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a")  # and nothing more
    slow_body = await Raw.open(app.port)
    slow_body.send(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    idle = await Raw.open(app.port)
    idle.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await idle.response())[0] == 200  # then it stays, keep-alive, saying nothing
    closed = await asyncio.gather(*(r.closed_by_server(timeout=5)
                                     for r in [*partial, slow_body, idle]))
    assert all(closed), closed
    for raw in [*partial, slow_body, idle]:
        await raw.close()


# 8. log lines, proxies, static files ------------------------------------------------------------

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


async def test_log_lines_escape_control_characters_from_clients(droid, api, caplog):
    caplog.set_level(logging.DEBUG)
    await api.get("/static/..%2f..%0aforged%20line%1b[31m")    # Tornado logs the path it decoded
    from conftest import Listener
    probe = Listener()
    with pytest.raises(Exception):  # refused, and logged with its namespace
        await probe.client.connect(droid.url, namespaces=["/x\nforged line\u2028"],
                                   transports=["websocket"], wait_timeout=5)
    subject = Listener()  # a token's subject is the user id the gateway logs
    forged = jwt.encode({"sub": "u\r\nforged\x1b", "exp": time.time() + 60}, TEST_SECRET,
                        algorithm="HS256")
    await subject.connect(droid.url, forged)
    await subject.close()

    def seen(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records)
    await wait_until(lambda: _true(seen("disconnected (user u\\r\\nforged\\x1b,")))
    assert seen("..\\nforged line\\x1b[31m is not in root static directory")
    assert seen("to namespace /x\\nforged line\\u2028: Invalid namespace")
    assert seen("connected from 127.0.0.1 (user u\\r\\nforged\\x1b)")
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if CONTROL.search(line)] == []


async def _true(value: Any) -> Any:
    return value


async def test_static_paths_out_of_the_folder_answer_the_json_error_shape(api):
    for path in ("/static/..%2f..", "/static/..%2f..%2fetc%2fpasswd", "/static/%2e%2e/setup.cfg",
                 "/static/nope.js"):
        reply = await api.get(path)
        assert reply.status in (403, 404), path
        assert reply.headers["Content-Type"].startswith("application/json"), path
        assert set(reply.body) == {"statusCode", "error", "message"}, path


async def _login_from(api: Api, forwarded: str | None) -> int:
    headers = {"X-Forwarded-For": forwarded, "X-Real-Ip": forwarded} if forwarded else {}
    reply = await api.post("/auth/login", {"email": "nobody@example.com", "password": "x" * 8},
                           headers=headers)
    return reply.status


async def test_x_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(droid_factory,
                                                                              caplog):
    plain = await droid_factory(DROID_AUTH_ATTEMPTS_PER_ADDRESS=3)
    api = Api(plain.url)
    # A forged header neither shows in the log nor escapes the per-address limit.
    statuses = [await _login_from(api, f"203.0.113.{n}") for n in range(4)]
    assert statuses == [401, 401, 401, 429]
    access = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert not [line for line in access if "203.0.113." in line]
    api.close()

    behind = await droid_factory(DROID_TRUSTED_PROXIES="127.0.0.1, 10.0.0.0/8",
                                 DROID_AUTH_ATTEMPTS_PER_ADDRESS=3)
    api = Api(behind.url)
    caplog.clear()
    # The client is the right-most address that is not a trusted proxy; X-Real-Ip is not used.
    statuses = [await _login_from(api, f"198.51.100.{n}, 10.1.2.3") for n in range(4)]
    assert statuses == [401, 401, 401, 401]
    access = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert any("(198.51.100.3)" in line for line in access), access
    api.close()

    heroku = await droid_factory(DROID_TRUSTED_PROXIES="*")
    api = Api(heroku.url)
    caplog.clear()
    await _login_from(api, "6.6.6.6, 192.0.2.7")  # the router appends the address it saw
    access = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert any("(192.0.2.7)" in line for line in access), access
    api.close()


# login and registration rate limits ------------------------------------------------------------

async def test_failed_logins_are_limited_per_account_alike_for_known_and_unknown_emails(
        droid_factory):
    app = await droid_factory(DROID_AUTH_ATTEMPTS_PER_ADDRESS=1000)  # only the account's limit
    api = Api(app.url)
    known = await api.register()
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@example.com"
    seen = {}
    for email in (known["email"], unknown):
        statuses = []
        for _ in range(11):
            reply = await api.post("/auth/login", {"email": email, "password": "wrong password"})
            statuses.append(reply.status)
        seen[email] = statuses, reply
    assert seen[known["email"]][0] == seen[unknown][0] == [401] * 10 + [429]
    for _, reply in seen.values():
        assert reply.body["statusCode"] == 429 and reply.body["error"] == "Too Many Requests"
        assert reply.body["message"].startswith("Too many attempts for this account")
        assert 1 <= int(reply.headers["Retry-After"]) <= 600
    # Locked means locked, even with the right password; another account is not affected.
    reply = await api.post("/auth/login", {"email": known["email"], "password": known["password"]})
    assert reply.status == 429
    other = await api.register()
    reply = await api.post("/auth/login", {"email": other["email"], "password": other["password"]})
    assert reply.status == 200
    api.close()


async def test_refused_registrations_are_limited_per_account(droid_factory):
    app = await droid_factory(DROID_AUTH_FAILURES_PER_ACCOUNT=3)
    api = Api(app.url)
    user = await api.register()
    statuses = [(await api.post("/auth/register", {"email": user["email"].upper(),
                                                   "password": "another password"})).status
                for _ in range(4)]
    assert statuses == [409, 409, 409, 429]
    api.close()


async def test_attempts_are_limited_per_address(droid_factory):
    app = await droid_factory(DROID_AUTH_ATTEMPTS_PER_ADDRESS=5)
    api = Api(app.url)
    statuses = []
    for n in range(3):
        statuses.append((await api.post("/auth/register", {
            "email": f"u{n}-{uuid.uuid4().hex[:6]}@example.com", "password": "p" * 8})).status)
        statuses.append((await api.post("/auth/login", {"email": f"x{n}@example.com",
                                                         "password": "p" * 8})).status)
    assert statuses == [201, 401, 201, 401, 201, 429]
    reply = await api.post("/auth/login", {"garbage": True})  # malformed attempts count too
    assert reply.status == 429 and reply.message.startswith("Too many attempts from this address")
    assert int(reply.headers["Retry-After"]) >= 1
    api.close()


async def test_an_unknown_email_costs_the_same_argon2_work_as_a_known_one():
    """The dummy hash verified for unknown e-mails has the parameters of real ones, so both
    paths cost one argon2 verification of the same cost."""
    import argon2
    from droid.auth import Passwords
    passwords = Passwords()
    real = await passwords.hash("correct horse")
    assert argon2.extract_parameters(passwords._dummy) == argon2.extract_parameters(real)


def _config_error(**env: Any) -> str:
    from droid.config import ConfigError
    with pytest.raises(ConfigError) as info:
        make_config(**env)
    return str(info.value)


async def test_limit_variables_are_checked_at_start_up():
    assert "DROID_TRUSTED_PROXIES" in _config_error(DROID_TRUSTED_PROXIES="10.0.0.0/8, nope")
    assert "DROID_TRUSTED_PROXIES" in _config_error(DROID_TRUSTED_PROXIES="*, 10.0.0.1")
    assert "DROID_MAX_BACKLOG_BYTES" in _config_error(DROID_MAX_BACKLOG_BYTES="1000")
    assert "DROID_HEADER_TIMEOUT_S" in _config_error(DROID_HEADER_TIMEOUT_S="soon")
    assert "DROID_AUTH_ATTEMPTS_PER_ADDRESS" in _config_error(DROID_AUTH_ATTEMPTS_PER_ADDRESS="0")
    config = make_config(DROID_TRUSTED_PROXIES="10.0.0.0/8, ::1", DROID_BODY_TIMEOUT_S="5")
    assert config.trusted_proxies == ("10.0.0.0/8", "::1") and config.body_timeout_s == 5.0
    assert make_config().trusted_proxies == ()  # unset: X-Forwarded-For is believed from no one


async def test_an_engineio_session_that_never_joins_events_is_ended(droid_factory, listen):
    """Like socket.io's connectTimeout: a session without a /events connection is ended (it
    used to live for as long as its client answered pings). This one never sends a CONNECT
    (DROID_CONNECT_PACKET_TIMEOUT_S); tests/test_sessions.py has the rest."""
    droid = await droid_factory(DROID_CONNECT_PACKET_TIMEOUT_S="1.5")
    polling = Polling(droid)
    idle = await polling.open()
    user = str(uuid.uuid4())
    tab = await listen(droid.url, jwt.encode({"sub": user, "exp": time.time() + 60}, TEST_SECRET,
                                             algorithm="HS256"))
    await tab.next("connected")
    await wait_until(lambda: _true(idle not in droid.sio.eio.sockets), timeout=5)
    assert (await polling.fetch(f"&sid={idle}", timeout=5)).code == 400
    # The one that joined in time stays.
    assert await tab.client.call("ping", {"message": "still"}, namespace="/events", timeout=5)
    polling.close()
