"""Log lines that stay one line: control characters in a log message are escaped.

Messages carry what clients send (paths, namespaces, token subjects, Tornado's own lines about
malformed requests), and a newline or an escape sequence in them could forge a log line or drive
a terminal. `install()` makes every LogRecord escape C0/C1 control characters, DEL and the
Unicode line separators of its formatted message (`\\n` becomes the two characters `\\` `n`);
tracebacks are formatted apart from the message and keep their lines.
"""
from __future__ import annotations

import logging
import re
from typing import Any

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else
                                f"\\u{ord(char):04x}")


def escape(text: str) -> str:
    """`text` with its control characters written as escapes."""
    return _CONTROL.sub(_escape_one, text)


class _SafeRecord(logging.LogRecord):
    def getMessage(self) -> str:  # noqa: N802 - logging's name
        return escape(super().getMessage())


def install() -> None:
    """Make every log record escape its message (idempotent; wraps another record factory)."""
    current = logging.getLogRecordFactory()
    if getattr(current, "droid_safe", False):
        return
    if current is logging.LogRecord:
        factory: Any = _SafeRecord
    else:
        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = current(*args, **kwargs)
            message = record.getMessage()
            record.msg, record.args = escape(message), ()
            return record
    factory.droid_safe = True
    logging.setLogRecordFactory(factory)
