"""`droid run`: create a task and show its answer as it streams, with a live status line; the
exit code is the task's outcome. Ctrl-C asks whether to cancel the task."""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Mapping

import click
from rich.console import Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ..client import Client, Conflict, DroidError
from .app import (INTERRUPTED, OK, TASK_CANCELLED, TASK_FAILED, USAGE, Context, cli, common,
                  exit_code_of, explain, fail)
from .output import STATUS_STYLE, Output

OUTCOME = {"completed": OK, "failed": TASK_FAILED, "cancelled": TASK_CANCELLED}


class RunView:
    """What `droid run` shows while the task runs.

    On a terminal: the answer above a live status line (spinner, status, time, attempt); only
    the line being written is redrawn, finished lines are printed once. Piped: the answer's
    pieces on stdout as they come, status changes as plain lines on stderr. `--json`: each
    envelope of the task on a line, then the finished task.
    """

    def __init__(self, out: Output, task: Mapping[str, Any]) -> None:
        self.out = out
        self.task_id = task["id"]
        self.status = task["status"]
        self.attempt = 1
        self.started = time.monotonic()
        self.shown = ""      # the answer as written so far
        self.partial = ""    # its last, unfinished line (terminal only)
        self.notice = ""
        self.live: Live | None = None
        if out.rich:
            self.spinner = Spinner("dots", style="cyan")
            self.live = Live(get_renderable=self._render, console=out.console, transient=True,
                             refresh_per_second=12, redirect_stdout=False,
                             redirect_stderr=False)
            self.live.start()
        elif not out.json:
            out.note(f"task {self.task_id} {self.status}")

    # updates ---------------------------------------------------------------------------------

    def envelope(self, env: Mapping[str, Any]) -> None:
        data = env.get("data") or {}
        if self.out.json:
            self.out.emit(env)
            return
        if env["event"] == "task.progress":
            self.write(data.get("delta") or "")
            return
        self.notice = ""
        status = data.get("status") or self.status
        if env["event"] == "task.processing":
            self.attempt = int(data.get("retryCount") or 0) + 1
        if env["event"] == "task.pending" and data.get("error"):
            self.say(f"attempt {self.attempt} failed: {data['error']}; retrying", "yellow")
            if self.shown:  # the next attempt writes its answer from the start
                self.write("\n")
                self.shown = ""
        if status != self.status:
            self.status = status
            if not self.out.rich and status not in OUTCOME:
                self.out.note(f"task {self.task_id} {status}")

    def reconnecting(self, error: DroidError, delay: float) -> None:
        self.notice = f"connection lost ({error}); reconnecting in {delay:.1f} s"
        if not self.out.rich and not self.out.json:
            self.out.note(self.notice)

    def say(self, text: str, style: str | None = None) -> None:
        if self.live is not None:
            self.live.console.print(Text(text, style=style or ""), soft_wrap=True)
        elif not self.out.json:
            self.out.note(text)

    def write(self, piece: str) -> None:
        if not piece:
            return
        self.shown += piece
        if self.live is None:
            sys.stdout.write(piece)
            sys.stdout.flush()
            return
        self.partial += piece
        width = max(20, self.out.console.width)
        lines = self.partial.split("\n")
        done, self.partial = lines[:-1], lines[-1]
        # A long unfinished line is wrapped here, at a space, so that the live area stays two
        # lines high whatever the answer's length.
        while len(self.partial) > width:
            cut = self.partial.rfind(" ", 0, width)
            cut = width if cut <= 0 else cut + 1
            done.append(self.partial[:cut].rstrip(" "))
            self.partial = self.partial[cut:]
        if done:
            # The live area is redrawn below what is printed with what it last rendered: give
            # it the new unfinished line first.
            self.live.refresh()
        for line in done:
            self.live.console.print(Text(line), soft_wrap=True)

    # the end ---------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
            if self.partial:
                self.out.console.print(Text(self.partial), soft_wrap=True)
                self.partial = ""

    def finish(self, task: Mapping[str, Any]) -> int:
        """Show the end (the rest of the answer if pieces were missed) and the outcome."""
        status = task["status"]
        if self.out.json:
            self.out.emit(task)
            return OUTCOME.get(status, OK)
        response = task.get("response") or ""
        if status == "completed" and response != self.shown:
            rest = response[len(self.shown):] if response.startswith(self.shown) else \
                ("\n" if self.shown else "") + response
            self.write(rest)
        self.stop()
        if self.shown and not self.out.rich and not self.shown.endswith("\n"):
            sys.stdout.write("\n")
            sys.stdout.flush()
        elapsed = time.monotonic() - self.started
        if status == "completed":
            self.out.note(f"✔ completed in {elapsed:.1f} s · {task.get('tokensUsed')} tokens · "
                          f"task {self.task_id}", "green")
        elif status == "failed":
            self.out.note(f"✖ failed: {task.get('error')} · task {self.task_id}", "red")
        else:
            self.out.note(f"✖ {status} · task {self.task_id}", STATUS_STYLE.get(status))
        return OUTCOME.get(status, OK)

    def _render(self) -> Group:
        # Lines of their own width, not a grid's: a line padded to the terminal's width wraps
        # as soon as the terminal echoes ^C after it, and the live area is then erased one
        # line short.
        line = Text()
        line.append(f"{self.status}", style=STATUS_STYLE.get(self.status, ""))
        line.append(f" · {time.monotonic() - self.started:.1f} s", style="dim")
        if self.attempt > 1:
            line.append(f" · attempt {self.attempt}", style="yellow")
        line.append(f" · task {self.task_id[:8]}", style="dim")
        if self.notice:
            line.append(f" · {self.notice}", style="yellow")
        status = Table.grid(padding=(0, 1))
        status.add_row(self.spinner, line)
        return Group(Text(self.partial), status) if self.partial else Group(status)


def parse_metadata(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        fail(f"--metadata is not valid JSON: {exc}", USAGE)
    if not isinstance(value, dict):
        fail("--metadata must be a JSON object", USAGE)
    return value


@cli.command()
@click.argument("prompt")
@click.option("--agent", metavar="ID", help="Agent id (default: the default agent).")
@click.option("--priority", type=click.Choice(["low", "normal", "high", "urgent"]),
              help="Priority (default: normal).")
@click.option("--metadata", metavar="JSON", help="A JSON object kept with the task.")
@click.option("--idempotency-key", metavar="KEY",
              help="Sent again within 24 hours, returns the first task instead of a new one.")
@click.option("--no-wait", is_flag=True, help="Create the task, print it, and exit.")
@common
def run(ctx: Context, prompt: str, agent: str | None, priority: str | None,
        metadata: str | None, idempotency_key: str | None, no_wait: bool) -> int:
    """Run PROMPT as a task and show the answer as it streams ("-" reads it from stdin).

    Exits 0 when the task completes, 1 when it fails, 3 when it is cancelled; Ctrl-C asks
    whether to cancel it (exit 130 either way)."""
    if prompt == "-":
        prompt = sys.stdin.read()
    meta = parse_metadata(metadata)
    with ctx.client() as client:
        after = None if no_wait else client.last_seq()
        task = client.tasks.create(prompt, agent=agent, priority=priority, metadata=meta,
                                   idempotency_key=idempotency_key)
        if no_wait:
            if ctx.out.json:
                ctx.out.emit(task)
            else:
                ctx.out.line(task["id"])
            return OK
        return follow(ctx, client, task, after)


def follow(ctx: Context, client: Client, task: Mapping[str, Any], after: int | None) -> int:
    """Show the task until it finishes; the exit code of its outcome."""
    view = RunView(ctx.out, task)
    try:
        final: Mapping[str, Any] = task
        for item in client.tasks.watch(task["id"], after=after, on_reconnect=view.reconnecting):
            if "event" in item:
                view.envelope(item)
            else:
                final = item
        return view.finish(final)
    except KeyboardInterrupt:
        view.stop()
        return interrupted(ctx, client, task["id"])
    except BaseException:
        view.stop()
        raise


def interrupted(ctx: Context, client: Client, task_id: str) -> int:
    """Ctrl-C: ask whether to cancel the task (when someone can answer), then exit 130."""
    out = ctx.out
    if not sys.stdin.isatty():
        out.note(f"task {task_id} keeps running (droid tasks cancel {task_id})")
        return INTERRUPTED
    try:
        cancel = click.confirm(f"\nCancel task {task_id}?", default=False, err=True)
    except (click.exceptions.Abort, KeyboardInterrupt, EOFError):
        cancel = False
    if not cancel:
        out.note(f"task {task_id} keeps running (droid tasks cancel {task_id})")
        return INTERRUPTED
    try:
        task = client.tasks.cancel(task_id)
        out.note(f"task {task_id} {task['status']}", STATUS_STYLE.get(task["status"]))
    except Conflict as exc:
        out.note(f"task {task_id} was not cancelled: {exc.text}", "yellow")
    except DroidError as exc:
        out.note(f"droid: {explain(exc, client.base_url)}", "red")
        return exit_code_of(exc)
    return INTERRUPTED
