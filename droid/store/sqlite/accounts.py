"""SQLite: the normalised e-mail of accounts (droid/emails.py), a mixin of SqliteStore; the
insert of a user.

`users.emailKey` (what an account is found by) and `users.emailSkeleton` (what a look-alike
shares) are unique. Both columns are added to a file of an older version when it is opened, and
the accounts stored before them get theirs there, in one transaction (several processes opening
one file do it once).
"""
from __future__ import annotations

import sqlite3

from ...emails import stored_forms, with_forms
from ...errors import Conflict
from .connection import SqliteBase

TAKEN = "Email is already registered"
LOOKALIKE = "Email looks like an address that is already registered"
_BATCH = 1000


class AccountsMixin(SqliteBase):
    def _create_schema(self, conn: sqlite3.Connection) -> None:
        super()._create_schema(conn)
        self._accounts_schema(conn)

    def _accounts_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(users)")}
            for column in ("emailKey", "emailSkeleton"):
                if column not in columns:
                    conn.execute(f"ALTER TABLE users ADD COLUMN {column} TEXT")
            conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS users_email_key ON users (emailKey)")
            conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS users_email_skeleton "
                         "ON users (emailSkeleton)")
            while True:
                rows = conn.execute("SELECT id, email FROM users WHERE emailKey IS NULL LIMIT ?",
                                    (_BATCH,)).fetchall()
                for user_id, email in rows:
                    for key, skeleton in stored_forms(user_id, email):
                        try:
                            conn.execute("UPDATE users SET emailKey = ?, emailSkeleton = ? "
                                         "WHERE id = ?", (key, skeleton, user_id))
                            break
                        except sqlite3.IntegrityError:
                            continue
                if len(rows) < _BATCH:
                    break
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def insert_user(self, doc: dict) -> None:
        await self._run(self._insert_user, doc)

    def _insert_user(self, doc: dict) -> None:
        doc = with_forms(doc)
        try:
            self._insert("users", doc)
        except sqlite3.IntegrityError:
            # SQLite names one broken constraint, not necessarily the one that matters here.
            same = self._conn.execute(
                "SELECT 1 FROM users WHERE email = ? OR emailKey = ?",
                (doc.get("email"), doc.get("emailKey"))).fetchone()
            raise Conflict(TAKEN if same else LOOKALIKE) from None

    async def user_by_email_key(self, key: str) -> dict | None:
        return await self._run(self._one, "SELECT * FROM users WHERE emailKey = ?", (key,))
