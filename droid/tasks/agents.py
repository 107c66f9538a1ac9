"""Agents: the built-in default agent and the ones users create."""
from __future__ import annotations

import datetime as dt

from ..errors import NotFound
from ..store import Store
from ..util import iso, new_id, utcnow

DEFAULT_AGENT_ID = "00000000-0000-4000-8000-000000000001"
DEFAULT_SYSTEM_PROMPT = "You are Droid, a helpful assistant. Answer clearly and concisely."
_EPOCH = dt.datetime(2024, 1, 1)


def agent_json(doc: dict) -> dict:
    return {"id": doc["_id"], "name": doc["name"], "description": doc.get("description"),
            "model": doc.get("model"), "systemPrompt": doc.get("systemPrompt"),
            "ownerId": doc.get("ownerId"), "createdAt": iso(doc["createdAt"])}


class AgentService:
    def __init__(self, store: Store, *, default_model: str | None) -> None:
        self.store = store
        self.default = {
            "_id": DEFAULT_AGENT_ID, "name": "Droid", "ownerId": None, "createdAt": _EPOCH,
            "description": ("The default agent: " + (f"model {default_model}" if default_model
                            else "the built-in demo agent (no LLM configured)")),
            "model": default_model or "droid-demo", "systemPrompt": DEFAULT_SYSTEM_PROMPT,
        }

    async def list(self, user_id: str) -> list[dict]:
        return [agent_json(self.default)] + [agent_json(d) for d in await self.store.agents_of(user_id)]

    async def create(self, user_id: str, *, name: str, model: str | None,
                     system_prompt: str | None, description: str | None) -> dict:
        doc = {"_id": new_id(), "name": name, "model": model, "systemPrompt": system_prompt,
               "description": description, "ownerId": user_id, "createdAt": utcnow()}
        await self.store.insert_agent(doc)
        return agent_json(doc)

    async def usable(self, user_id: str, agent_id: str | None) -> dict:
        """The agent a task of this user may run on (default when None); raises NotFound."""
        if agent_id is None or agent_id == DEFAULT_AGENT_ID:
            return self.default
        doc = await self.store.agent_by_id(agent_id)
        if doc is None or doc.get("ownerId") != user_id:
            raise NotFound("Agent not found")
        return doc

    async def for_task(self, agent_id: str) -> dict:
        """The agent a worker runs a task on; the default one if it has disappeared."""
        if agent_id == DEFAULT_AGENT_ID:
            return self.default
        return await self.store.agent_by_id(agent_id) or self.default
