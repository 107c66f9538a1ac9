"""Logins against floods (issue 22, finding 4): argon2 work bounded overall with a fast 503
beyond a short queue, its memory accounted, and per-address limits keyed by /64 for IPv6.

Real server, real HTTP clients, each flood request from its own loopback address (any 127.x.y.z
is local on Linux), so that the per-address limit is not what stops them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from conftest import Api
from droid.util import dumps, loads

pytestmark = pytest.mark.asyncio


async def login_from(http: AsyncHTTPClient, url: str, source: str, email: str,
                     password: str) -> tuple[int, dict, dict]:
    reply = await http.fetch(HTTPRequest(
        url + "/auth/login", method="POST", body=dumps({"email": email, "password": password}),
        headers={"Content-Type": "application/json"}, network_interface=source,
        request_timeout=60), raise_error=False)
    return reply.code, loads(reply.body), reply.headers


async def test_argon2_work_is_bounded_and_beyond_its_queue_answered_at_once(droid_factory,
                                                                           caplog):
    caplog.set_level(logging.INFO, logger="droid.app")
    app = await droid_factory(DROID_ARGON2_CONCURRENCY=1, DROID_ARGON2_QUEUE=2)
    api = Api(app.url)
    user = await api.register()
    http = AsyncHTTPClient(force_instance=True, max_clients=64)
    argon2_threads: set[int] = set()
    sampling = True

    async def sample() -> None:
        while sampling:
            argon2_threads.add(sum(1 for t in threading.enumerate()
                                   if t.name.startswith("droid-argon2")))
            await asyncio.sleep(0.005)

    sampler = asyncio.ensure_future(sample())
    # 40 wrong passwords at once, each from an address of its own (each far under its limit).
    replies = await asyncio.gather(*[
        login_from(http, app.url, f"127.0.1.{n + 1}", user["email"], "wrong password")
        for n in range(40)])
    sampling = False
    await sampler
    statuses = [status for status, _, _ in replies]
    assert set(statuses) <= {401, 503} and statuses.count(401) >= 3
    busy = [(body, headers) for status, body, headers in replies if status == 503]
    assert len(busy) >= 20
    for body, headers in busy:
        assert body == {"statusCode": 503, "error": "Service Unavailable",
                        "message": "Too many logins and registrations at once; retry in a second"}
        assert headers["Retry-After"] == "1"
    assert max(argon2_threads) == 1  # never more than DROID_ARGON2_CONCURRENCY hashing
    # ... and at a lower priority than the event loop's thread (Linux: a nice value per thread).
    (worker,) = [t for t in threading.enumerate() if t.name.startswith("droid-argon2")]
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert os.getpriority(os.PRIO_PROCESS, worker.native_id) == min(19, loop_nice + 10)
    # The flood is over: the real user signs in.
    status, body, _ = await login_from(http, app.url, "127.0.2.1", user["email"],
                                       user["password"])
    assert status == 200, body
    # Its memory is stated at start-up: argon2-cffi's memory_cost times the concurrency.
    assert "argon2: 1 at once (64 MiB each, up to 64 MiB), 2 more may wait" in caplog.text
    http.close()
    api.close()


async def test_ipv6_addresses_are_counted_by_their_64(droid_factory):
    """Through a trusted proxy, so that the client's address can be an IPv6 one."""
    app = await droid_factory(DROID_TRUSTED_PROXIES="127.0.0.1",
                              DROID_AUTH_ATTEMPTS_PER_ADDRESS=3)
    api = Api(app.url)

    async def login(address: str) -> int:
        reply = await api.post("/auth/login", {"email": f"{uuid.uuid4().hex[:8]}@example.com",
                                               "password": "wrong password"},
                               headers={"X-Forwarded-For": address})
        return reply.status

    same_64 = ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff:ffff:ffff:ffff",
               "2001:db8:1:2:abcd::9"]
    assert [await login(a) for a in same_64] == [401, 401, 401, 429]
    assert await login("2001:db8:1:3::1") == 401  # the next /64 is another client
    assert [await login("::ffff:192.0.2.1") for _ in range(3)] == [401] * 3
    assert await login("192.0.2.1") == 429  # an IPv4-mapped address is its IPv4 address
    api.close()
