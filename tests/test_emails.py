"""E-mail spellings (issue 22, finding 9): one normalised spelling for registering and signing in
(NFKC, lower case, IDNA for the domain), look-alikes of a registered address refused, and
accounts stored before normalisation still signing in (a real process on an older file)."""
from __future__ import annotations

import sqlite3
import unicodedata

import argon2
import pytest

from conftest import Api
from droid_process import spawn  # noqa: F401 - a fixture
from droid.emails import normalise

pytestmark = pytest.mark.asyncio
TAKEN = "Email is already registered"
LOOKALIKE = "Email looks like an address that is already registered"


async def register(api: Api, email: str, password: str = "correct horse") -> tuple[int, object]:
    reply = await api.post("/auth/register", {"email": email, "password": password})
    return reply.status, reply.body if reply.status != 201 else reply.body["user"]["email"]


async def login(api: Api, email: str, password: str = "correct horse") -> int:
    return (await api.post("/auth/login", {"email": email, "password": password})).status


async def test_every_spelling_of_an_address_is_one_account(api):
    nfd = unicodedata.normalize("NFD", "José@Example.com")
    assert (await register(api, nfd))[0] == 201
    assert await login(api, nfd) == 200  # the spelling it was registered with (was 401)
    assert await login(api, unicodedata.normalize("NFC", "josé@example.com")) == 200
    assert await login(api, "ＪＯＳＥ\u0301@example.com") == 200  # fullwidth is NFKC-equal
    status, email = await register(api, "user@Bücher.example")
    assert (status, email) == (201, "user@bücher.example")
    assert await login(api, "user@xn--bcher-kva.example") == 200  # punycode (was 401)
    status, body = await register(api, "USER@xn--bcher-kva.example")
    assert status == 409 and body["message"] == TAKEN


@pytest.mark.parametrize("lookalike, message", [
    ("\u0430da@example.com", LOOKALIKE),        # Cyrillic а
    ("ada@ex\u0430mple.com", LOOKALIKE),        # Cyrillic а in the domain
    ("\uff41da@example.com", TAKEN),            # fullwidth ａ: NFKC makes it the same address
    ("ADA@EXAMPLE.COM", TAKEN),
])
async def test_look_alikes_of_a_registered_address_are_refused(api, lookalike, message):
    assert (await register(api, "ada@example.com"))[0] == 201
    status, body = await register(api, lookalike)
    assert status == 409 and body == {"statusCode": 409, "error": "Conflict", "message": message}


async def test_a_dotted_capital_i_is_the_same_address(api):
    assert (await register(api, "info@example.com"))[0] == 201
    status, body = await register(api, "\u0130nfo@example.com")  # İ
    assert status == 409 and body["message"] == TAKEN
    assert await login(api, "\u0130NFO@example.com") == 200
    assert (await register(api, "b\u0131ll@example.com"))[0] == 201  # dotless ı is no i ...
    assert (await register(api, "bill@example.com"))[0] == 409       # ... but looks like one


async def test_accounts_stored_before_normalisation_still_sign_in(spawn, tmp_path):
    """A data folder written by an older Droid: users without emailKey / emailSkeleton, two of
    whom now share a key (fullwidth and ASCII) and two a skeleton (Cyrillic and Latin). Each
    still signs in with the e-mail it was stored with and its own password."""
    data = tmp_path / "data"
    data.mkdir()
    hasher = argon2.PasswordHasher()
    old = [("u1", "ada@example.com", "first password"),
           ("u2", "\uff41da@example.com", "second password"),
           ("u3", "\u0430lice@example.com", "third password"),
           ("u4", "alice@example.com", "fourth password")]
    conn = sqlite3.connect(data / "droid.sqlite3")
    conn.execute("CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, "
                 "name TEXT, passwordHash TEXT, createdAt INTEGER NOT NULL)")
    conn.executemany("INSERT INTO users VALUES (?, ?, NULL, ?, 0)",
                     [(uid, email, hasher.hash(pw)) for uid, email, pw in old])
    conn.commit()
    conn.close()
    droid = await spawn("upgraded", DROID_DATA_DIR=str(data), JWT_SECRET="s" * 40).ready()
    api = Api(droid.url)
    for uid, email, password in old:
        reply = await api.post("/auth/login", {"email": email, "password": password})
        assert reply.status == 200, (email, reply.body)
        assert reply.body["user"] == {"id": uid, "email": email, "name": None,
                                      "createdAt": "1970-01-01T00:00:00.000Z"}
    assert await login(api, "ada@example.com", "second password") == 401
    # New look-alikes of the old accounts are refused.
    assert (await register(api, "\u0430da@example.com"))[0] == 409
    api.close()
    conn = sqlite3.connect(data / "droid.sqlite3")
    keys = dict(conn.execute("SELECT id, emailKey FROM users"))
    conn.close()
    assert keys == {"u1": normalise("ada@example.com").key, "u2": "legacy:u2",
                    "u3": normalise("\u0430lice@example.com").key,
                    "u4": normalise("alice@example.com").key}
