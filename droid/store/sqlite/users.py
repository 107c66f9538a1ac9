"""Users and agents in the SQLite store (a user's insert and e-mail forms: accounts.py)."""
from __future__ import annotations

from .connection import SqliteBase


class UsersMixin(SqliteBase):
    # users -----------------------------------------------------------------------------------

    async def user_by_email(self, email: str) -> dict | None:
        return await self._run(self._one, "SELECT * FROM users WHERE email = ?", (email,))

    async def user_by_id(self, user_id: str) -> dict | None:
        return await self._run(self._one, "SELECT * FROM users WHERE id = ?", (user_id,))

    # agents ----------------------------------------------------------------------------------

    async def insert_agent(self, doc: dict) -> None:
        await self._run(self._insert, "agents", doc)

    async def agents_of(self, owner_id: str) -> list[dict]:
        return await self._run(
            self._all, "SELECT * FROM agents WHERE ownerId = ? ORDER BY createdAt, id",
            (owner_id,))

    async def agent_by_id(self, agent_id: str) -> dict | None:
        return await self._run(self._one, "SELECT * FROM agents WHERE id = ?", (agent_id,))

