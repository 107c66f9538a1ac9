"""Register, login, me, and the verification of every kind of token."""
import asyncio
import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import ISO_RE, TEST_SECRET, Api, Listener, make_config
from droid.auth import AuthError, Tokens

pytestmark = pytest.mark.asyncio


async def test_register_returns_a_working_token_and_never_the_password(api, droid):
    reply = await api.post("/auth/register", {"email": "Ada@Example.com", "password": "s3cret-pass",
                                              "name": "Ada"})
    assert reply.status == 201
    body = reply.body
    assert body["tokenType"] == "Bearer" and body["expiresIn"] == 3600
    assert set(body["user"]) == {"id", "email", "name", "createdAt"}
    assert body["user"]["email"] == "ada@example.com" and body["user"]["name"] == "Ada"
    assert "s3cret-pass" not in str(body)
    me = await api.get("/auth/me", token=body["accessToken"])
    assert me.status == 200 and me.body == body["user"]
    import re
    assert re.match(ISO_RE, me.body["createdAt"])
    stored = await droid.store.user_by_email("ada@example.com")
    assert stored["passwordHash"].startswith("$argon2") and "s3cret-pass" not in str(stored)


async def test_duplicate_registration_is_409_whatever_the_case(api):
    await api.register("bob@example.com")
    reply = await api.post("/auth/register", {"email": "BOB@example.com", "password": "another-pw"})
    assert reply.status == 409
    assert reply.body == {"statusCode": 409, "error": "Conflict",
                          "message": "Email is already registered"}


@pytest.mark.parametrize("body, fragment", [
    ({"email": "not-an-email", "password": "longenough"}, "email"),
    ({"email": "a@example.com", "password": "short"}, "password"),
    ({"email": "a@example.com"}, "password is required"),
    ({"email": "nope", "password": "x"}, "email must be a valid email address"),
    ({"email": {"$gt": ""}, "password": "longenough"}, "email"),
    ({"email": "a@example.com", "password": {"$gt": ""}}, "password"),
    ({"email": "a@example.com", "password": 12345678}, "password"),
])
async def test_invalid_registration_is_400(api, body, fragment):
    reply = await api.post("/auth/register", body)
    assert reply.status == 400
    assert reply.body["statusCode"] == 400 and reply.body["error"] == "Bad Request"
    messages = reply.body["message"]
    assert any(fragment in m for m in (messages if isinstance(messages, list) else [messages]))


async def test_login_succeeds_and_fails_with_one_message(api):
    user = await api.register("carol@example.com", "carol-password")
    ok = await api.post("/auth/login", {"email": "Carol@example.com", "password": "carol-password"})
    assert ok.status == 200 and ok.body["user"]["id"] == user["id"]
    wrong_pw = await api.post("/auth/login", {"email": "carol@example.com", "password": "nope-nope"})
    no_user = await api.post("/auth/login", {"email": "nobody@example.com", "password": "nope-nope"})
    assert wrong_pw.status == no_user.status == 401
    assert wrong_pw.body == no_user.body == {"statusCode": 401, "error": "Unauthorized",
                                             "message": "Invalid email or password"}


@pytest.mark.parametrize("body", [
    {"email": {"$gt": ""}, "password": {"$gt": ""}},
    {"email": {"$ne": None}, "password": "whatever1"},
    {"email": "carol@example.com", "password": {"$regex": ".*"}},
])
async def test_operator_injection_in_login_is_rejected(api, body):
    await api.register("carol@example.com", "carol-password")
    reply = await api.post("/auth/login", body)
    assert reply.status == 400
    assert "accessToken" not in str(reply.body)


def _token(claims: dict, key=TEST_SECRET, alg="HS256", headers=None) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


async def _me(api: Api, token: str):
    return await api.get("/auth/me", token=token)


async def test_tampered_tokens_are_401(api):
    user = await api.register()
    now = int(time.time())
    good = {"sub": user["id"], "iat": now, "exp": now + 60}
    header, payload, sig = user["token"].split(".")
    cases = {
        "other key": _token(good, key="x" * 40),
        "alg none": jwt.encode(good, None, algorithm="none"),
        "expired": _token({**good, "exp": now - 60}),
        "no sub": _token({"iat": now, "exp": now + 60}),
        "no exp": _token({"sub": user["id"], "iat": now}),
        "garbage": "not.a.token",
        "swapped payload": f"{header}.{_token(good).split('.')[1]}x.{sig}",
        "sub not a string": _token({**good, "sub": 42}),
    }
    for name, token in cases.items():
        reply = await _me(api, token)
        assert reply.status == 401, name
        assert reply.body["error"] == "Unauthorized", name
        expected = "Token expired" if name == "expired" else "Invalid token"
        assert reply.body["message"] == expected, name
    missing = await api.get("/auth/me")
    assert missing.status == 401 and missing.body["message"] == "Authentication required"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")


async def test_external_rs256_and_es256_tokens_are_accepted_with_a_public_key(droid_factory):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    app = await droid_factory(JWT_PUBLIC_KEY=pem.decode(), JWT_ISSUER="https://idp.example",
                              JWT_AUDIENCE="droid")
    api = Api(app.url)
    now = int(time.time())
    claims = {"sub": "ext-user-1", "exp": now + 60, "iss": "https://idp.example", "aud": "droid",
              "email": "ext@example.com"}
    me = await _me(api, _token(claims, rsa_key, "RS256"))
    assert me.status == 200 and me.body["id"] == "ext-user-1" and me.body["email"] == "ext@example.com"
    # HS256 signed with the public key (key confusion), wrong audience, missing issuer: refused.
    assert (await _me(api, _token({**claims, "aud": "other"}, rsa_key, "RS256"))).status == 401
    no_iss = {k: v for k, v in claims.items() if k != "iss"}
    assert (await _me(api, _token(no_iss, rsa_key, "RS256"))).status == 401
    assert (await _me(api, _token(claims, rsa_key, "PS256"))).status == 401
    # Tokens issued here carry iss and aud, and are accepted.
    user = await api.register()
    issued = jwt.decode(user["token"], options={"verify_signature": False})
    assert issued["iss"] == "https://idp.example" and issued["aud"] == "droid"
    assert (await _me(api, user["token"])).status == 200
    api.close()

    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    app2 = await droid_factory(JWT_PUBLIC_KEY=ec_pem.decode())
    api2 = Api(app2.url)
    me2 = await _me(api2, _token({"sub": "ec-user", "exp": now + 60}, ec_key, "ES256"))
    assert me2.status == 200 and me2.body["id"] == "ec-user"
    assert (await _me(api2, _token({"sub": "ec-user", "exp": now + 60}, rsa_key, "RS256"))).status == 401
    api2.close()


# issue 14 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("claims", [
    {"exp": True}, {"exp": False}, {"exp": "9999999999"}, {"exp": None}, {"exp": [1]},
    {"exp": 10**400}, {"iat": True}, {"nbf": True},
])
async def test_malformed_time_claims_are_invalid_not_expired(api, droid, claims):
    """`exp: true` used to be refused as `Token expired` (PyJWT reads true as 1)."""
    user = await api.register()
    now = int(time.time())
    token = _sign({"sub": user["id"], "iat": now, "exp": now + 60, **claims})
    reply = await _me(api, token)
    assert reply.status == 401 and reply.body["message"] == "Invalid token", reply.body
    # The handshake says the same: connect_error {message: "Invalid token"}.
    probe = Listener()
    with pytest.raises(Exception):
        await probe.connect(droid.url, token)
    assert probe.connect_error["message"] == "Invalid token"


def _sign(claims: dict) -> str:
    """HS256 by hand with the test key: PyJWT's encoder refuses some malformed claims."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(TEST_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


# verified tokens are remembered (issue 12's throughput) ------------------------------------------

async def test_a_remembered_token_still_expires_on_time(api):
    """A token is checked in full once, then remembered: its `exp` still holds on every use."""
    user = await api.register()
    now = int(time.time())
    # Within the 5 s leeway for about 2 s more, then expired.
    token = _token({"sub": user["id"], "iat": now - 60, "exp": now - Tokens.LEEWAY_S + 2})
    first = await _me(api, token)
    assert first.status == 200 and first.body["id"] == user["id"]
    assert (await _me(api, token)).status == 200  # the remembered identity
    deadline = time.monotonic() + 10
    while True:
        reply = await _me(api, token)
        if reply.status != 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert reply.status == 401 and reply.body["message"] == "Token expired", reply.body
    # ... and a token is remembered by its exact text: another signature is checked again.
    head, body, _ = user["token"].split(".")
    forged = f"{head}.{body}.{_token({'sub': user['id'], 'exp': now + 60}, key='k' * 40)[-43:]}"
    assert (await _me(api, user["token"])).status == 200
    assert (await _me(api, forged)).body["message"] == "Invalid token"


async def test_verified_tokens_are_checked_once_and_the_memory_is_bounded(monkeypatch):
    tokens = Tokens(make_config())
    calls = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    token, _ = tokens.issue("user-1")
    assert tokens.verify(token).user_id == tokens.verify(token).user_id == "user-1"
    assert len(calls) == 1
    for n in range(Tokens.VERIFIED_MAX + 10):
        tokens.verify(tokens.issue(f"user-{n}", n=n)[0])
    assert len(tokens._verified) == Tokens.VERIFIED_MAX
    with pytest.raises(AuthError):
        tokens.verify(token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))
    assert len(tokens._verified) == Tokens.VERIFIED_MAX
