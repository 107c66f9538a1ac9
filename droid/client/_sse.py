"""An incremental Server-Sent Events parser (the WHATWG event-stream format).

Fed the bytes of a response as they arrive, so that the reader regains control on every chunk,
keepalive comments included: that is what lets `tasks.wait(timeout=...)` keep its deadline on a
quiet stream without a thread or a timer (a parser that only hands back whole events, such as
httpx-sse's, blocks until the next event).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SSEEvent:
    event: str
    data: str
    id: str | None


class SSEParser:
    """`feed(bytes)` returns the events completed by those bytes, in order."""

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._has_id = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        events: list[SSEEvent] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return events
            end, skip = cut
            line = self._buffer[:end].decode("utf-8", errors="replace")
            self._buffer = self._buffer[end + skip:]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data and not self._event:
                self._has_id = False
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data),
                             self._id if self._has_id else None)
            self._event, self._data, self._has_id = "", [], False
            return event
        if line.startswith(":"):
            return None  # a comment (keepalive)
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id, self._has_id = value, True
        return None


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the first line of `buffer` ends, and the length of its end (CRLF, LF or CR). A CR
    at the very end may be the first half of a CRLF: wait for the next byte."""
    lf = buffer.find(b"\n")
    cr = buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, 1)
    if cr + 1 == len(buffer):
        return None
    return (cr, 2) if buffer[cr + 1:cr + 2] == b"\n" else (cr, 1)
