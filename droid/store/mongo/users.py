"""Users and agents in the MongoDB store (a user's insert and e-mail forms: accounts.py)."""
from __future__ import annotations

from pymongo import ASCENDING

from .connection import MongoBase


class UsersMixin(MongoBase):
    # users -----------------------------------------------------------------------------------

    async def user_by_email(self, email: str) -> dict | None:
        return await self.users.find_one({"email": email})

    async def user_by_id(self, user_id: str) -> dict | None:
        return await self.users.find_one({"_id": user_id})

    # agents ----------------------------------------------------------------------------------

    async def insert_agent(self, doc: dict) -> None:
        await self.agents.insert_one(dict(doc))

    async def agents_of(self, owner_id: str) -> list[dict]:
        return await self.agents.find({"ownerId": owner_id}).sort(
            [("createdAt", ASCENDING), ("_id", ASCENDING)]).to_list(None)

    async def agent_by_id(self, agent_id: str) -> dict | None:
        return await self.agents.find_one({"_id": agent_id})

