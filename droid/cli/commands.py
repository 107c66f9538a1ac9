"""`droid login`, `logout`, `tasks`, `tail`, `keys` and `webhooks`."""
from __future__ import annotations

import itertools
import socket
from typing import Any

import click

from ..client import Client, DroidError, Resync, Unauthorized
from . import config as saved
from .app import INTERRUPTED, OK, USAGE, Context, cli, common, exit_code_of, explain, fail
from .output import EVENT_STYLE, STATUS_STYLE, Output, describe, excerpt, short_time
from .run import follow

# login / logout --------------------------------------------------------------------------


@cli.command()
@click.option("--url", envvar="DROID_URL", metavar="URL", show_envvar=True,
              help="Droid server (default: http://localhost:3000).")
@click.option("--email", metavar="EMAIL", help="Account e-mail (asked when not given).")
@click.option("--api-key", "existing_key", metavar="KEY",
              help="Keep this existing API key instead of creating one (no password asked).")
@click.option("--name", "key_name", metavar="NAME",
              help="Name of the API key created (default: droid CLI on HOSTNAME).")
@click.option("--json", "json_mode", is_flag=True, help="Write the result as one JSON line.")
def login(url: str | None, email: str | None, existing_key: str | None, key_name: str | None,
          json_mode: bool) -> int:
    """Log in: asks for your e-mail and password, creates an API key and keeps it in your
    config folder ($XDG_CONFIG_HOME/droid/config.json, readable by you alone)."""
    ctx = Context(url, None, Output(json_mode))
    try:
        return _login(ctx, url, email, existing_key, key_name)
    except DroidError as exc:
        fail(explain(exc, url or "the server"), exit_code_of(exc))
    except saved.ConfigFileError as exc:
        fail(str(exc), USAGE)


def _login(ctx: Context, url: str | None, email: str | None, existing_key: str | None,
           key_name: str | None) -> int:
    stored: dict = {}
    if existing_key:
        with Client(url, existing_key) as client:
            me = client.auth.me()  # the key works, and whose it is
            stored = {"url": client.base_url, "apiKey": existing_key, "email": me.get("email")}
    else:
        email = email or click.prompt("E-mail", err=True)
        password = click.prompt("Password", hide_input=True, err=True)
        with Client(url) as anonymous:
            token = anonymous.auth.login(email, password)["accessToken"]
        with Client(url, token=token) as client:
            name = key_name or f"droid CLI on {socket.gethostname()}"[:100]
            key = client.api_keys.create(name, scope="write")
            stored = {"url": client.base_url, "apiKey": key["key"], "keyId": key["id"],
                      "keyPrefix": key.get("prefix"), "email": email}
    path = saved.save(stored)
    if ctx.out.json:
        ctx.out.emit({"url": stored["url"], "email": stored.get("email"),
                      "keyId": stored.get("keyId"), "config": str(path)})
    else:
        ctx.out.note(f"Logged in to {stored['url']} as {stored.get('email')}; API key kept in "
                     f"{path}", "green")
    return OK


@cli.command()
@click.option("--keep-key", is_flag=True, help="Forget the key here without revoking it.")
def logout(keep_key: bool) -> int:
    """Log out: revoke the API key `droid login` created and forget it."""
    out = Output(False)
    try:
        stored = saved.load()
        if not stored:
            out.note("not logged in")
            return OK
        if stored.get("keyId") and not keep_key:
            try:
                with Client(stored.get("url"), stored.get("apiKey")) as client:
                    client.api_keys.revoke(stored["keyId"])
                out.note("API key revoked")
            except Unauthorized:
                out.note("the API key was already revoked")
            except DroidError as exc:
                out.note(f"the API key could not be revoked ({explain(exc, stored['url'])}); "
                         "revoke it with `droid keys revoke` later", "yellow")
        saved.remove()
    except saved.ConfigFileError as exc:
        fail(str(exc), USAGE)
    out.note(f"Logged out of {stored.get('url')}")
    return OK


# tasks -----------------------------------------------------------------------------------


@cli.group()
def tasks() -> None:
    """List, show, cancel and wait for your tasks."""


@tasks.command("ls")
@click.option("--status", type=click.Choice(["pending", "processing", "completed", "failed",
                                             "cancelled"]), help="Only tasks in this state.")
@click.option("--agent", metavar="ID", help="Only the tasks of this agent.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="How many (newest first).")
@common
def tasks_ls(ctx: Context, status: str | None, agent: str | None, limit: int) -> int:
    """Your tasks, newest first."""
    with ctx.client() as client:
        found = list(itertools.islice(client.tasks.list(status=status, agent=agent,
                                                        page_size=min(limit, 100)), limit))
    if ctx.out.json:
        for task in found:
            ctx.out.emit(task)
    else:
        ctx.out.table(["ID", "STATUS", "PRIORITY", "CREATED", "PROMPT"],
                      [(t["id"], t["status"], t["priority"], short_time(t["createdAt"]),
                        excerpt(t["prompt"], 50)) for t in found])
    return OK


@tasks.command("show")
@click.argument("task_id", metavar="ID")
@common
def tasks_show(ctx: Context, task_id: str) -> int:
    """One task, with its answer."""
    with ctx.client() as client:
        task = client.tasks.get(task_id)
    if ctx.out.json:
        ctx.out.emit(task)
        return OK
    ctx.out.fields([("id", task["id"]), ("status", task["status"]),
                    ("priority", task["priority"]), ("agent", task["agentId"]),
                    ("created", short_time(task["createdAt"])),
                    ("completed", short_time(task.get("completedAt"))),
                    ("retries", task.get("retryCount")), ("tokens", task.get("tokensUsed")),
                    ("time (ms)", task.get("executionTimeMs")), ("metadata", task.get("metadata")),
                    ("error", task.get("error")), ("prompt", task["prompt"])])
    if task.get("response"):
        ctx.out.line()
        ctx.out.line(task["response"] or "")
    return OK


@tasks.command("cancel")
@click.argument("task_id", metavar="ID")
@common
def tasks_cancel(ctx: Context, task_id: str) -> int:
    """Cancel a pending or running task (exit 6 when it had already finished)."""
    with ctx.client() as client:
        task = client.tasks.cancel(task_id)
    if ctx.out.json:
        ctx.out.emit(task)
    else:
        ctx.out.line(f"{task['id']} {task['status']}", STATUS_STYLE.get(task["status"]))
    return OK


@tasks.command("wait")
@click.argument("task_id", metavar="ID")
@common
def tasks_wait(ctx: Context, task_id: str) -> int:
    """Follow a task until it finishes (exit codes as `droid run`)."""
    with ctx.client() as client:
        return follow(ctx, client, client.tasks.get(task_id), None)


# tail ------------------------------------------------------------------------------------


@cli.command()
@click.option("--after", type=click.IntRange(0), metavar="SEQ",
              help="Start after this seq (0: everything kept). Default: from now on.")
@click.option("--progress", is_flag=True, help="Show the live task.progress pieces too.")
@common
def tail(ctx: Context, after: int | None, progress: bool) -> int:
    """Every event of yours, live, until Ctrl-C: resumes by itself after a dropped connection
    or a server restart, missing nothing and repeating nothing."""
    out = ctx.out

    def reconnecting(error: DroidError, delay: float) -> None:
        out.note(f"connection lost ({error}); reconnecting in {delay:.1f} s", "yellow")

    with ctx.client() as client:
        start = client.last_seq() if after is None else after
        if not out.json:
            out.note(f"following events after seq {start} on {client.base_url} (Ctrl-C stops)",
                     "dim")
        try:
            for item in client.events(start, progress=progress, on_reconnect=reconnecting):
                if isinstance(item, Resync):
                    message = (f"resync: events {item.after + 1} to {item.oldest_seq - 1} are no "
                               "longer kept; going on from what is")
                    if out.json:
                        out.emit({"event": "resync", "data": {"after": item.after,
                                                              "oldestSeq": item.oldest_seq}})
                    else:
                        out.note(message, "yellow")
                elif out.json:
                    out.emit(item)
                else:
                    data = item.get("data") or {}
                    seq = "-" if item.get("seq") is None else str(item["seq"])
                    out.line(f"{seq:>6}  {short_time(item.get('timestamp'))}  "
                             f"{item['event']:<16} {data.get('taskId', '')}  {describe(item)}",
                             EVENT_STYLE.get(item["event"]))
        except KeyboardInterrupt:
            return INTERRUPTED
    return OK


# keys ------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Your API keys: create, list, revoke."""


@keys.command("create")
@click.argument("name")
@click.option("--scope", type=click.Choice(["read", "write"]), default="write",
              show_default=True, help="read: GET routes and events only.")
@common
def keys_create(ctx: Context, name: str, scope: str) -> int:
    """Create an API key called NAME; its secret is shown this once."""
    with ctx.client() as client:
        key = client.api_keys.create(name, scope=scope)
    if ctx.out.json:
        ctx.out.emit(key)
    else:
        ctx.out.line(key["key"])
        ctx.out.note(f"API key {key['id']} ({key['scope']}): keep it now, it is not shown again")
    return OK


@keys.command("ls")
@common
def keys_ls(ctx: Context) -> int:
    """Your API keys (without their secret), oldest first."""
    with ctx.client() as client:
        found = client.api_keys.list()
    if ctx.out.json:
        for key in found:
            ctx.out.emit(key)
    else:
        ctx.out.table(["ID", "NAME", "PREFIX", "SCOPE", "CREATED", "LAST USED"],
                      [(k["id"], k["name"], k["prefix"], k["scope"], short_time(k["createdAt"]),
                        short_time(k.get("lastUsedAt")) or "never") for k in found])
    return OK


@keys.command("revoke")
@click.argument("key_id", metavar="ID")
@common
def keys_revoke(ctx: Context, key_id: str) -> int:
    """Revoke an API key: it stops working at once."""
    with ctx.client() as client:
        client.api_keys.revoke(key_id)
    if ctx.out.json:
        ctx.out.emit({"id": key_id, "revoked": True})
    else:
        ctx.out.line(f"{key_id} revoked")
    return OK


# webhooks --------------------------------------------------------------------------------


@cli.group()
def webhooks() -> None:
    """Your webhook endpoints: add, list, test, deliveries."""


@webhooks.command("add")
@click.argument("endpoint_url", metavar="URL")
@click.option("--event", "events", multiple=True, metavar="EVENT",
              help="An event to send (repeatable; default: task.completed, task.failed, "
                   "task.cancelled).")
@click.option("--description", metavar="TEXT")
@common
def webhooks_add(ctx: Context, endpoint_url: str, events: tuple[str, ...],
                 description: str | None) -> int:
    """Add an endpoint at URL; its signing secret is shown this once."""
    with ctx.client() as client:
        endpoint = client.webhooks.create(endpoint_url, events=list(events) or None,
                                          description=description)
    if ctx.out.json:
        ctx.out.emit(endpoint)
    else:
        ctx.out.line(endpoint["id"])
        ctx.out.note(f"signing secret (shown once): {endpoint['secret']}")
    return OK


@webhooks.command("ls")
@common
def webhooks_ls(ctx: Context) -> int:
    """Your webhook endpoints."""
    with ctx.client() as client:
        found = client.webhooks.list()
    if ctx.out.json:
        for endpoint in found:
            ctx.out.emit(endpoint)
    else:
        ctx.out.table(["ID", "URL", "EVENTS", "ENABLED", "CREATED"],
                      [(w["id"], w["url"], ",".join(w["events"]),
                        "yes" if w["enabled"] else f"no: {w.get('disabledReason') or ''}",
                        short_time(w["createdAt"])) for w in found])
    return OK


@webhooks.command("test")
@click.argument("endpoint_id", metavar="ID")
@common
def webhooks_test(ctx: Context, endpoint_id: str) -> int:
    """Send a webhook.test event to the endpoint."""
    with ctx.client() as client:
        delivery = client.webhooks.test(endpoint_id)
    if ctx.out.json:
        ctx.out.emit(delivery)
    else:
        ctx.out.line(f"delivery {delivery['id']} {delivery['status']}",
                     STATUS_STYLE.get(delivery["status"]))
    return OK


@webhooks.command("deliveries")
@click.argument("endpoint_id", metavar="ID")
@click.option("--status", type=click.Choice(["pending", "succeeded", "failed"]))
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@common
def webhooks_deliveries(ctx: Context, endpoint_id: str, status: str | None, limit: int) -> int:
    """The endpoint's deliveries, newest first, with their last attempt."""
    with ctx.client() as client:
        found = list(itertools.islice(client.webhooks.deliveries(
            endpoint_id, status=status, page_size=min(limit, 100)), limit))
    if ctx.out.json:
        for delivery in found:
            ctx.out.emit(delivery)
        return OK
    rows = []
    for d in found:
        attempts: list[Any] = list(d.get("attempts") or [])
        last: dict[str, Any] = dict(attempts[-1]) if attempts else {}
        outcome = last.get("statusCode") or excerpt(last.get("error"), 40) or ""
        rows.append((d["id"], d["event"], d["status"], len(attempts), outcome,
                     short_time(d["createdAt"])))
    ctx.out.table(["ID", "EVENT", "STATUS", "ATTEMPTS", "LAST", "CREATED"], rows)
    return OK


