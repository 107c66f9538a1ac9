"""REST routes of API keys (droid/apikeys.py)."""
from __future__ import annotations

from .schemas import ApiKeyBody
from .base import ApiHandler


class ApiKeysHandler(ApiHandler):
    api_keys = property(lambda self: self.settings["api_keys"])

    async def get(self) -> None:
        self.reply(await self.api_keys.list(self.user_id))

    async def post(self) -> None:
        user_id = self.user_id
        body = self.body(ApiKeyBody)
        self.reply(await self.api_keys.create(user_id, name=body.name, scope=body.scope), 201)


class ApiKeyHandler(ApiHandler):
    api_keys = property(lambda self: self.settings["api_keys"])

    async def delete(self, key_id: str) -> None:
        await self.api_keys.revoke(self.user_id, key_id)
        self.set_status(204)
        self.finish()
