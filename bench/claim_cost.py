#!/usr/bin/env python3
"""What a claim and a task's admission cost in the SQLite store with many users and tasks pending
(issue 22: fair claims must stay index seeks).

    .venv/bin/python bench/claim_cost.py            # 1,000 / 10,000 / 100,000 pending, 1 / 100 / 1,000 users

For each size, a fresh file gets that many pending tasks spread over that many users, each with
its place in the fair queue from `admit_task` (one transaction), then CLAIMS claims and ADMITS
admissions are timed one after the other, as a worker makes them (each is one hop to the store's
thread and one transaction). Also prints SQLite's plan of the claim's two lookups.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from droid.quotas import Quota  # noqa: E402
from droid.store.sqlite import SqliteStore  # noqa: E402
from droid.store.sqlite_quotas import _HEAD, _USERS_NEXT  # noqa: E402
from droid.util import to_ms, utcnow  # noqa: E402

CLAIMS = 2000
ADMITS = 2000


def fill(store: SqliteStore, pending: int, users: int) -> None:
    conn = store._conn
    conn.execute("BEGIN IMMEDIATE")
    now = utcnow() - dt.timedelta(hours=1)
    ids = [str(uuid.uuid4()) for _ in range(users)]
    quota = Quota(0, 0, 0)
    for n in range(pending):
        user = ids[n % users]
        created = now + dt.timedelta(milliseconds=n)
        vkey = store._admit(conn, user, to_ms(created), 10, quota)
        store._insert("tasks", {
            "_id": str(uuid.uuid4()), "userId": user, "agentId": "a", "status": "pending",
            "priority": "normal", "priorityRank": (0, 1, 2, 3)[n % 4], "prompt": "p" * 10,
            "retryCount": 0, "createdAt": created, "updatedAt": created, "runAfter": created,
            "attempt": 0, "vkey": vkey})
    conn.execute("COMMIT")


async def run(pending: int, users: int, folder: Path) -> dict:
    store = SqliteStore(str(folder / f"claims-{pending}-{users}.sqlite3"))
    await store.open()
    try:
        await store._run(fill, store, pending, users)
        plans = await store._run(lambda: [
            " / ".join(row[3] for row in store._conn.execute("EXPLAIN QUERY PLAN " + sql, args))
            for sql, args in ((_HEAD, (0,)), (_USERS_NEXT, ("u", 0)))])
        now = utcnow()
        claims = []
        for _ in range(min(CLAIMS, pending)):
            start = time.perf_counter()
            await store.claim_task("bench", now, now + dt.timedelta(seconds=30))
            claims.append(time.perf_counter() - start)
        admits = []
        quota = Quota(0, 10**9, 0)
        for n in range(ADMITS):
            start = time.perf_counter()
            await store.admit_task(f"late-{n % 50}", to_ms(utcnow()), 10, quota)
            admits.append(time.perf_counter() - start)
    finally:
        await store.close()
    us = lambda xs, q: 1e6 * statistics.quantiles(xs, n=100)[q - 1]  # noqa: E731
    return {"pending": pending, "users": users, "claimP50": us(claims, 50),
            "claimP99": us(claims, 99), "admitP50": us(admits, 50), "admitP99": us(admits, 99),
            "plans": plans}


async def main(args: argparse.Namespace) -> None:
    print("| tasks pending | users | claim p50 / p99 (us) | admission p50 / p99 (us) |")
    print("|---|---|---|---|")
    plans = None
    with tempfile.TemporaryDirectory(prefix="droid-claims-") as tmp:
        for pending in args.pending:
            for users in args.users:
                r = await run(pending, users, Path(tmp))
                plans = r["plans"]
                print(f"| {pending:,} | {users:,} | {r['claimP50']:.0f} / {r['claimP99']:.0f} | "
                      f"{r['admitP50']:.0f} / {r['admitP99']:.0f} |", flush=True)
    print(f"\nplans: head of the fair queue: {plans[0]}; the user's next task: {plans[1]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pending", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 100, 1000])
    asyncio.run(main(parser.parse_args()))
