"""How the command line writes: rich colour and tables on a terminal, plain tab-separated text
when piped, one JSON object per line with `--json`. Notes and errors go to stderr."""
from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Mapping, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {"pending": "yellow", "processing": "cyan", "completed": "green",
                "failed": "red", "cancelled": "magenta", "succeeded": "green"}
EVENT_STYLE = {"task.created": "bold", "task.processing": "cyan", "task.completed": "green",
               "task.failed": "red", "task.cancelled": "magenta", "task.pending": "yellow",
               "task.progress": "dim"}


class Output:
    """The three ways of writing; `json` is the `--json` flag."""

    def __init__(self, json_mode: bool = False) -> None:
        self.json = json_mode
        self.console = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        self.rich = not json_mode and self.console.is_terminal

    def emit(self, value: Any) -> None:
        """One JSON object, one line."""
        sys.stdout.write(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    def line(self, text: str = "", style: str | None = None) -> None:
        """A line of human output on stdout (styled on a terminal)."""
        if self.rich:
            self.console.print(Text(text, style=style or ""), soft_wrap=True)
        else:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def note(self, text: str, style: str | None = None) -> None:
        """A line for the person, on stderr (progress, hints, warnings)."""
        if self.err.is_terminal:
            self.err.print(Text(text, style=style or ""), soft_wrap=True)
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]],
              styles: Sequence[str | None] | None = None) -> None:
        """A rich table on a terminal, else a header line and tab-separated rows."""
        rows = [["" if v is None else str(v) for v in row] for row in rows]
        if not self.rich:
            for row in [list(columns), *rows]:
                sys.stdout.write("\t".join(row) + "\n")
            sys.stdout.flush()
            return
        table = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            cells = [Text(value, style=(styles[i] if styles and i < len(styles) and styles[i]
                                        else None) or STATUS_STYLE.get(value, ""))
                     for i, value in enumerate(row)]
            table.add_row(*cells)
        self.console.print(table)

    def fields(self, pairs: Iterable[tuple[str, Any]]) -> None:
        """`name  value` lines (a record shown to a person)."""
        pairs = [(k, v) for k, v in pairs if v is not None and v != ""]
        width = max((len(k) for k, _ in pairs), default=0)
        for key, value in pairs:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            if self.rich:
                line = Text(f"{key:<{width}}  ", style="bold")
                line.append(text, style=STATUS_STYLE.get(text, ""))
                self.console.print(line, soft_wrap=True)
            else:
                sys.stdout.write(f"{key:<{width}}  {text}\n")
        sys.stdout.flush()


def short_time(iso: str | None) -> str:
    """`2024-01-01T10:20:30.123Z` as `2024-01-01 10:20:30` (UTC)."""
    return (iso or "")[:19].replace("T", " ")


def excerpt(text: str | None, width: int = 60) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def describe(envelope: Mapping[str, Any]) -> str:
    """What an envelope says, in a few words, after its event name."""
    data = envelope.get("data") or {}
    event = envelope.get("event")
    if event == "task.created":
        return f"{data.get('priority', '')} {excerpt(data.get('prompt'), 50)!r}".strip()
    if event == "task.processing":
        return f"attempt {int(data.get('retryCount') or 0) + 1}"
    if event == "task.completed":
        return f"{data.get('tokensUsed')} tokens in {data.get('executionTimeMs')} ms"
    if event in ("task.failed", "task.pending"):
        return excerpt(data.get("error"), 80)
    if event == "task.progress":
        return repr(excerpt(data.get("delta"), 60))
    return ""
