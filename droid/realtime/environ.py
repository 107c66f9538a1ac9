"""The environ python-engineio and python-socketio see for each request of the endpoint."""
from __future__ import annotations

import sys
from typing import Any
from urllib.parse import urlsplit


class _Payload:
    """A request body as python-engineio reads it (`await environ['wsgi.input'].read(n)`): what
    its Tornado driver's `AwaitablePayload` does, without defining that class anew for every
    request (a class object is 2.5 KB and costs a type creation per request)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes | None) -> None:
        self.payload = payload or b""

    async def read(self, length: int | None = None) -> bytes:
        if length is None:
            r, self.payload = self.payload, b""
        else:
            r, self.payload = self.payload[:length], self.payload[length:]
        return r


def translate_request(handler: Any) -> dict:
    """python-engineio's Tornado `translate_request` (4.15), with a module-level body reader and
    the client's address (python-engineio's puts a fixed 127.0.0.1)."""
    request = handler.request
    path = request.path
    query = request.query or ""
    environ = {
        "wsgi.input": _Payload(request.body),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.async": True,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "SERVER_SOFTWARE": "aiohttp",
        "REQUEST_METHOD": request.method,
        "QUERY_STRING": query,
        "RAW_URI": path + "?" + query if query else path,
        "SERVER_PROTOCOL": "HTTP/%s" % request.version,
        "REMOTE_ADDR": request.remote_ip or "?",  # the client's, behind trusted proxies too
        "REMOTE_PORT": "0",
        "SERVER_NAME": "aiohttp",
        "SERVER_PORT": "0",
        "tornado.handler": handler,
    }
    for name, value in request.headers.items():
        name = name.upper()
        if name == "CONTENT-TYPE":
            environ["CONTENT_TYPE"] = value
        elif name == "CONTENT-LENGTH":
            environ["CONTENT_LENGTH"] = value
        else:
            environ["HTTP_" + name.replace("-", "_")] = value
    environ["wsgi.url_scheme"] = environ.get("HTTP_X_FORWARDED_PROTO", "http")
    environ["PATH_INFO"] = urlsplit(path).path
    environ["SCRIPT_NAME"] = ""
    return environ
