"""A real OpenAI-compatible chat-completions server on loopback, scripted from tests.

Usage, inside the test's event loop:

    fake = FakeLLM(answer="Hello there.")
    await fake.start()                     # listens on 127.0.0.1, an ephemeral port
    fake.script("error500", "stream")      # the next two requests, in order
    ...  OpenAIProvider(fake.base_url, ...)  # base_url ends with /v1
    fake.requests[0].body["model"], fake.requests[0].headers.get("Authorization")
    await fake.stop()

Each request to `POST /v1/chat/completions` takes the next scripted behaviour, or `fake.mode` when
the script is empty. Behaviours (a name, or a `Step` to override the answer, delay or usage for
that one request):

    auto              SSE when the body asks "stream": true, else JSON (the default mode)
    ok / json         a non-streamed JSON completion, whatever the request asked
    stream            SSE: one chunk per piece of the answer, a usage chunk, then [DONE]
    stream_no_usage   SSE without the usage chunk
    stream_no_done    SSE with content and usage but no [DONE]
    stream_empty      SSE with a role chunk, a usage chunk and [DONE], but no content
    stream_malformed  SSE whose second event is not JSON
    stream_error      SSE whose first event is {"error": {...}} (what vLLM sends mid-stream)
    stream_cut        SSE: the first piece, then the connection is closed (no end of body)
    stream_hang       SSE: the first piece, then nothing until the client leaves or stop()
    hang              accept the request, never answer (until the client leaves or stop())
    malformed         200 application/json whose body is not JSON
    no_choices        200 JSON without "choices"
    html              200 text/html
    reset             close the connection without any answer
    errorNNN          HTTP NNN with an OpenAI-style error body, e.g. error500, error429, error400;
                      the message echoes the request's Authorization header (to prove scrubbing),
                      or is `Step.answer` when given; a 429 says `Retry-After: 1` unless
                      `Step.headers` says otherwise
    stream_big        SSE of `Step.size` bytes of answer in 64 KiB pieces (made as they are sent)
    json_big          200 application/json of `Step.size` bytes (a padding field), sent in 1 MiB
                      pieces, as long as the client reads
    redirect          307 to `Step.location` (the same path on another server, say)

`Step.headers` are added to that answer. Every request records `sent_bytes`, the body bytes the
fake wrote (for the big ones: how much the client took before it hung up).

Each `ReceivedRequest` has `ended` (an asyncio.Event set when the fake is done with the request)
and `outcome`: "answered", or "client_left" when the client closed the connection first;
`disconnected` says whether the client has closed the connection that request came on.
`open_connections` counts the client connections still open (kept alive between requests, or
not); `wait_until(condition)` polls a condition such as these two, with a timeout.

`refused_url()` gives a base URL on which nothing listens. `FakeLLM(tls=True)` serves HTTPS with
a self-signed certificate (which no client trusts).
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import re
import ssl
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, StreamClosedError
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

DEFAULT_ANSWER = "Hello from the fake LLM. It speaks the chat-completions API on loopback."
DEFAULT_USAGE: dict[str, int] = {"prompt_tokens": 11, "completion_tokens": 17, "total_tokens": 28}

_STATUS_TEXT = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                408: "Request Timeout", 409: "Conflict", 429: "Too Many Requests",
                500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclasses.dataclass(frozen=True)
class Step:
    """One scripted behaviour, with optional overrides for that request only."""

    kind: str
    answer: str | None = None
    chunk_delay_s: float | None = None
    usage: dict[str, int] | None = None
    chunks: list[str] | None = None
    size: int = 0
    headers: dict[str, str] | None = None
    location: str | None = None


@dataclasses.dataclass
class ReceivedRequest:
    """What the fake received: `body` is the parsed JSON (None if it was not JSON)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes
    behaviour: str
    outcome: str = "pending"
    sent_bytes: int = 0
    at: float = dataclasses.field(default_factory=time.monotonic)  # when it arrived
    ended: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    connection: IOStream | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def disconnected(self) -> bool:
        """Whether the connection this request came on is closed (Tornado saw its end)."""
        return self.connection is not None and self.connection.closed()


def split_answer(answer: str) -> list[str]:
    """The pieces the fake streams for `answer` by default: one word (and its spaces) each."""
    return re.findall(r"\S+\s*|\s+", answer) or [answer]


def refused_url() -> str:
    """A base URL (ending with /v1) whose port was bound then closed: connections are refused."""
    sock, port = bind_unused_port()
    sock.close()
    return f"http://127.0.0.1:{port}/v1"


class FakeLLM:
    """The server and its control panel; see the module docstring."""

    def __init__(self, *, answer: str = DEFAULT_ANSWER, mode: str = "auto",
                 chunk_delay_s: float = 0.0, usage: dict[str, int] | None = DEFAULT_USAGE,
                 chunks: list[str] | None = None,
                 answer_for: Callable[[Any], str] | None = None, tls: bool = False) -> None:
        self.answer = answer
        self.answer_for = answer_for  # computes the answer from the request body, if set
        self.mode = mode
        self.chunk_delay_s = chunk_delay_s
        self.usage = usage
        self.chunks = chunks  # explicit stream pieces; default split_answer(answer)
        self.requests: list[ReceivedRequest] = []
        self.connections: list[IOStream] = []
        self.port = 0
        self.tls = tls
        self._queue: deque[Step] = deque()
        self._server: HTTPServer | None = None
        self._released = asyncio.Event()
        self._arrived = asyncio.Condition()

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    @property
    def scripted(self) -> int:
        """How many scripted behaviours are still waiting for a request."""
        return len(self._queue)

    @property
    def open_connections(self) -> int:
        """Client connections accepted and not closed yet."""
        return sum(1 for stream in self.connections if not stream.closed())

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait until `condition()` is true, checking every 5 ms; raises TimeoutError.

        Polled: Tornado has no public hook for the end of a connection once its request is done.
        """
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.005)

    def script(self, *steps: str | Step) -> None:
        """Queue behaviours for the next requests, one per request, in order."""
        for step in steps:
            self._queue.append(step if isinstance(step, Step) else Step(step))

    def release(self) -> None:
        """Let every request held by `hang` or `stream_hang` end now."""
        self._released.set()

    async def wait_for_requests(self, count: int, timeout_s: float = 5.0) -> list[ReceivedRequest]:
        """Wait until at least `count` requests have arrived; raises TimeoutError."""
        async with asyncio.timeout(timeout_s):
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return self.requests

    async def start(self) -> FakeLLM:
        sock, self.port = bind_unused_port()
        app = Application([(r"/v1/chat/completions", _CompletionsHandler, {"fake": self}),
                           (r"/v1/models", _ModelsHandler)])
        self._server = _TrackingServer(app, ssl_options=_self_signed() if self.tls else None)
        self._server.fake = self
        self._server.add_sockets([sock])
        self._released = asyncio.Event()
        return self

    async def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None

    async def __aenter__(self) -> FakeLLM:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # Used by the handler ---------------------------------------------------------------------
    def _next(self) -> Step:
        return self._queue.popleft() if self._queue else Step(self.mode)

    async def _record(self, request: ReceivedRequest) -> None:
        async with self._arrived:
            self.requests.append(request)
            self._arrived.notify_all()


def _self_signed() -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as folder:  # load_cert_chain reads files only
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        context.load_cert_chain(cert_file, key_file)
    return context


class _TrackingServer(HTTPServer):
    """Tornado's HTTP server, keeping every accepted connection's stream for the fake."""

    fake: FakeLLM  # set after construction: HTTPServer takes its arguments in initialize()

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        self.fake.connections.append(stream)
        super().handle_stream(stream, address)


class _ModelsHandler(RequestHandler):
    def get(self) -> None:
        self.write({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


class _CompletionsHandler(RequestHandler):
    fake: FakeLLM

    def initialize(self, fake: FakeLLM) -> None:
        self.fake = fake
        self.left = asyncio.Event()

    def on_connection_close(self) -> None:
        self.left.set()

    async def post(self) -> None:
        step = self.fake._next()
        try:
            body = orjson.loads(self.request.body)
        except orjson.JSONDecodeError:
            body = None
        received = ReceivedRequest(
            method=self.request.method or "POST", path=self.request.path,
            headers=dict(self.request.headers.get_all()), body=body, raw=self.request.body,
            behaviour=step.kind, connection=getattr(self.request.connection, "stream", None))
        await self.fake._record(received)
        self.received = received
        self.step = step
        for name, value in (step.headers or {}).items():
            self.set_header(name, value)
        try:
            await self._behave(step, body)
            received.outcome = "client_left" if self.left.is_set() else "answered"
        except StreamClosedError:
            received.outcome = "client_left"  # a timeout or a cancel on the client's side
        finally:
            received.ended.set()

    async def _behave(self, step: Step, body: Any) -> None:
        kind = step.kind
        if kind == "auto":
            kind = "stream" if isinstance(body, dict) and body.get("stream") else "ok"
        match = re.fullmatch(r"error(\d{3})", kind)
        if match:
            self._error(int(match.group(1)), step.answer)
        elif kind in ("ok", "json"):
            self._json(step, body)
        elif kind.startswith("stream"):
            await self._stream(kind, step, body)
        elif kind == "hang":
            await self._hold()
        elif kind == "malformed":
            self.set_header("Content-Type", "application/json")
            self.write(b"this is not json {")
        elif kind == "no_choices":
            self.write({"id": "chatcmpl-x", "object": "chat.completion", "model": "fake"})
        elif kind == "html":
            self.set_header("Content-Type", "text/html")
            self.write(b"<html><body>Hello</body></html>")
        elif kind == "reset":
            self.detach().close()
        elif kind == "json_big":
            await self._json_big(step.size)
        elif kind == "redirect":
            self.set_status(307)
            self.set_header("Location", step.location or "/")
        else:
            raise ValueError(f"FakeLLM: unknown behaviour {kind!r}")

    def _answer(self, step: Step, body: Any) -> str:
        if step.answer is not None:
            return step.answer
        if self.fake.answer_for is not None:
            return self.fake.answer_for(body)
        return self.fake.answer

    def _model(self, body: Any) -> str:
        model = body.get("model") if isinstance(body, dict) else None
        return model if isinstance(model, str) else "fake-model"

    def _usage(self, step: Step) -> dict[str, int] | None:
        return step.usage if step.usage is not None else self.fake.usage

    def _error(self, status: int, message: str | None) -> None:
        auth = self.request.headers.get("Authorization", "(none)")
        self.set_status(status, _STATUS_TEXT.get(status, "Error"))
        if status == 429 and "Retry-After" not in (self.step.headers or {}):
            self.set_header("Retry-After", "1")
        self.write({"error": {
            "message": message or f"Fake failure {status} (request had Authorization: {auth})",
            "type": "server_error" if status >= 500 else "invalid_request_error",
            "code": None}})

    def _json(self, step: Step, body: Any) -> None:
        reply: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
            "created": int(time.time()), "model": self._model(body),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self._answer(step, body)}}],
        }
        usage = self._usage(step)
        if usage is not None:
            reply["usage"] = usage
        self.write(reply)

    async def _stream(self, kind: str, step: Step, body: Any) -> None:
        answer = self._answer(step, body)
        pieces = step.chunks or self.fake.chunks or split_answer(answer)
        delay = step.chunk_delay_s if step.chunk_delay_s is not None else self.fake.chunk_delay_s
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self._model(body)}
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")

        async def send(payload: Any) -> None:
            data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
            await self._send(b"data: " + data + b"\n\n")

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if kind == "stream_error":
            await send({"error": {"message": "Fake stream failure", "type": "server_error"}})
            return
        await send(chunk({"role": "assistant", "content": ""}))
        if kind == "stream_big":
            piece, sent = "x" * (64 * 1024), 0
            while sent < step.size and not self.left.is_set():
                await send(chunk({"content": piece}))
                sent += len(piece)
            pieces = []
        if kind == "stream_empty":
            pieces = []
        for index, piece in enumerate(pieces):
            if delay:
                await asyncio.sleep(delay)
            await send(chunk({"content": piece}))
            if kind == "stream_malformed":
                await send(b"{not json")
                return
            if kind == "stream_cut":
                self.detach().close()
                return
            if kind == "stream_hang" and index == 0:
                await self._hold()
                return
        await send(chunk({}, "stop"))
        usage = self._usage(step)
        if usage is not None and kind != "stream_no_usage":
            await send({**base, "choices": [], "usage": usage})
        if kind != "stream_no_done":
            await send(b"[DONE]")

    async def _json_big(self, size: int) -> None:
        self.set_header("Content-Type", "application/json")
        piece = b" " * (1024 * 1024)
        await self._send(b'{"id": "chatcmpl-big", "choices": [], "padding": "')
        sent = 0
        while sent < size and not self.left.is_set():
            await self._send(piece)
            sent += len(piece)
        await self._send(b'"}')

    async def _send(self, data: bytes) -> None:
        self.write(data)
        self.received.sent_bytes += len(data)
        await self.flush()

    async def _hold(self) -> None:
        """Wait until the client leaves or the test releases (or stops) the fake."""
        released = asyncio.ensure_future(self.fake._released.wait())
        left = asyncio.ensure_future(self.left.wait())
        try:
            await asyncio.wait([released, left], return_when=asyncio.FIRST_COMPLETED)
        finally:
            released.cancel()
            left.cancel()
