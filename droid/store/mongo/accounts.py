"""MongoDB: the normalised e-mail of accounts (droid/emails.py), a mixin of MongoStore; the
insert of a user.

`emailKey` and `emailSkeleton` have unique indexes. Accounts stored by an older version get both
when the store opens, before the indexes are built (one pass over the users without them).
"""
from __future__ import annotations

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError

from ...emails import stored_forms, with_forms
from ...errors import Conflict
from .connection import MongoBase

TAKEN = "Email is already registered"
LOOKALIKE = "Email looks like an address that is already registered"


class AccountsMixin(MongoBase):
    async def _create_indexes(self) -> None:
        await super()._create_indexes()
        await self._accounts_indexes()

    async def _accounts_indexes(self) -> None:
        async for doc in self.users.find({"emailKey": {"$exists": False}},
                                         {"_id": True, "email": True}):
            for key, skeleton in stored_forms(doc["_id"], doc.get("email") or ""):
                if await self.users.find_one({"_id": {"$ne": doc["_id"]},
                                              "$or": [{"emailKey": key},
                                                      {"emailSkeleton": skeleton}]}) is None:
                    break
            await self.users.update_one({"_id": doc["_id"]},
                                        {"$set": {"emailKey": key, "emailSkeleton": skeleton}})
        await self.users.create_index([("emailKey", ASCENDING)], unique=True, name="email_key")
        await self.users.create_index([("emailSkeleton", ASCENDING)], unique=True,
                                      name="email_skeleton")

    async def insert_user(self, doc: dict) -> None:
        doc = with_forms(doc)
        try:
            await self.users.insert_one(doc)
        except DuplicateKeyError:
            same = await self.users.find_one({"$or": [{"email": doc.get("email")},
                                                      {"emailKey": doc.get("emailKey")}]})
            raise Conflict(TAKEN if same else LOOKALIKE) from None

    async def user_by_email_key(self, key: str) -> dict | None:
        return await self.users.find_one({"emailKey": key})
