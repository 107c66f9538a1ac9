"""REST routes for auth, agents and tasks."""
from __future__ import annotations

from ..emails import LEGACY, normalise
from ..errors import Conflict, Invalid, Unauthorized
from .schemas import AgentBody, LoginBody, RegisterBody, TaskBody, TaskQuery
from ..util import iso, new_id, utcnow
from ..web import write_api_error
from .base import ApiHandler

LOGIN_FAILED = "Invalid email or password"


def user_json(doc: dict) -> dict:
    return {"id": doc["_id"], "email": doc["email"], "name": doc.get("name"),
            "createdAt": iso(doc.get("createdAt"))}


class _AuthBase(ApiHandler):
    """Sign-in and registration: rate limited per client address and per e-mail
    (droid/http/ratelimit.py), the same way whether the e-mail is registered or not."""

    limits = property(lambda self: self.settings["auth_limits"])

    def token_reply(self, user: dict, status: int) -> None:
        token, expires_in = self.tokens.issue(user["_id"], email=user["email"])
        self.reply({"accessToken": token, "tokenType": "Bearer", "expiresIn": expires_in,
                    "user": user_json(user)}, status)


class RegisterHandler(_AuthBase):
    async def post(self) -> None:
        self.limits.attempt(self.request.remote_ip or "?")
        body = self.body(RegisterBody)
        try:
            email = normalise(body.email)
        except ValueError:
            raise Invalid("email must be a valid email address") from None
        self.limits.check_account(email.key)
        user = {"_id": new_id(), "email": email.display, "emailKey": email.key,
                "emailSkeleton": email.skeleton, "name": body.name,
                "passwordHash": await self.settings["passwords"].hash(body.password),
                "createdAt": utcnow()}
        try:
            await self.store.insert_user(user)
        except Conflict:
            self.limits.failed(email.key)
            raise
        self.token_reply(user, 201)


class LoginHandler(_AuthBase):
    async def post(self) -> None:
        self.limits.attempt(self.request.remote_ip or "?")
        body = self.body(LoginBody)
        try:
            key = normalise(body.email).key
        except ValueError:
            key = body.email.strip().lower()
        self.limits.check_account(key)
        passwords = self.settings["passwords"]
        user = await self.store.user_by_email_key(key)
        # An unknown e-mail is verified against a dummy hash of the same cost (auth.Passwords).
        ok = await passwords.verify(user and user.get("passwordHash"), body.password)
        if not ok:
            # An account stored before e-mails were normalised whose key another account took
            # (droid/emails.py) is found by the e-mail it was stored with.
            old = await self.store.user_by_email(body.email.strip().lower())
            if old is not None and old["_id"] != (user or {}).get("_id") and \
                    str(old.get("emailKey") or LEGACY).startswith(LEGACY):
                user = old
                ok = await passwords.verify(old.get("passwordHash"), body.password)
        if not ok or user is None:
            self.limits.failed(key)
            raise Unauthorized(LOGIN_FAILED)
        self.token_reply(user, 200)


class MeHandler(ApiHandler):
    async def get(self) -> None:
        identity = self.authenticate()
        user = await self.store.user_by_id(identity.user_id)
        if user is None:  # a token of an external issuer: its claims are all we know
            claims = identity.claims
            self.reply({"id": identity.user_id, "email": claims.get("email"),
                        "name": claims.get("name"), "createdAt": None})
            return
        self.reply(user_json(user))


class AgentsHandler(ApiHandler):
    async def get(self) -> None:
        self.reply(await self.agent_service.list(self.user_id))

    async def post(self) -> None:
        user_id = self.user_id
        body = self.body(AgentBody)
        self.reply(await self.agent_service.create(
            user_id, name=body.name, model=body.model, system_prompt=body.systemPrompt,
            description=body.description), 201)


class TasksHandler(ApiHandler):
    async def get(self) -> None:
        user_id = self.user_id
        q = self.query(TaskQuery)
        self.reply(await self.task_service.page(user_id, status=q.status, agent_id=q.agentId,
                                                limit=q.limit, cursor=q.cursor))

    async def post(self) -> None:
        user_id = self.user_id
        refused = self.task_service.refused(user_id)
        if refused is not None:
            # Answered as it is, not raised: a flood of them leaves no traceback cycles behind.
            write_api_error(self, refused)
            return
        body = self.body(TaskBody)
        key = self.request.headers.get("Idempotency-Key")
        if key is not None and not (1 <= len(key) <= 255 and key.isprintable()):
            raise Invalid("Idempotency-Key must be 1 to 255 printable characters")
        agent = await self.agent_service.usable(user_id, body.agentId)
        task, created = await self.task_service.create(
            user_id, agent_id=agent["_id"], prompt=body.prompt, priority=body.priority,
            metadata=body.metadata, idempotency_key=key)
        self.reply(task, 201 if created else 200)


class TaskHandler(ApiHandler):
    async def get(self, task_id: str) -> None:
        self.reply(await self.task_service.get(self.user_id, task_id))


class CancelHandler(ApiHandler):
    async def post(self, task_id: str) -> None:
        self.reply(await self.task_service.cancel(self.user_id, task_id))
