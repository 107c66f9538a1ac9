"""Serving (`droid`, `droid serve`, `python -m droid`): options, configuration, logging, serving
until SIGTERM or SIGINT, and the exit codes (2 for anything the operator must change)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Callable

import tornado.netutil

from . import __version__
from .collector import Collector
from .config import ConfigError, keep_generated_secret, load_config
from .store import StoreUnavailable

log = logging.getLogger("droid")


def describe_storage(config) -> None:
    """Say first where the data lives (and whether it survives a restart)."""
    if config.mongodb_uri:
        log.info("storing data in MongoDB (database %s)", config.mongodb_db)
    elif config.data_dir == ":memory:":
        log.warning("DROID_DATA_DIR=:memory: storing data in memory; nothing persists "
                    "across restarts")
    else:
        log.info("MONGODB_URI is not set: storing data in SQLite at %s (DROID_DATA_DIR)",
                 os.path.abspath(config.sqlite_path))


HELP = """\
Configuration comes from environment variables, or a .env file in the working directory (the
environment wins). The main ones:

  PORT, HOST            where to listen (3000, 0.0.0.0)
  DROID_ENV             development (default), test or production
  MONGODB_URI           a MongoDB database (default: the embedded SQLite database)
  DROID_DATA_DIR        folder of the embedded database (droid-data, in the working folder)
  JWT_SECRET            HS256 key, at least 32 bytes (default: a random development key)
  CORS_ORIGIN           comma-separated allowed origins (default *)
  REDIS_URL             share events between processes
  LLM_BASE_URL, LLM_MODEL, LLM_API_KEY
                        an OpenAI-compatible API (default: the built-in demo agent)
  METRICS_TOKEN         bearer token for GET /metrics
  LOG_LEVEL             DEBUG, INFO (default), WARNING, ERROR
  DROID_EVENT_LOOP      auto (default: uvloop where installed), uvloop or asyncio

Every variable is described in README.md and docs/contract.md. A bad value, or a port that
cannot be listened on, stops start-up with one line on stderr and exit code 2.
"""


COMMANDS = """
Commands (the command line, a client of a Droid server; each has --help):
  droid login | logout            keep an API key for the commands below, or drop it
  droid run "PROMPT"              run a task and stream its answer
  droid tasks ls | show | cancel | wait
  droid tail                      every event of yours, live, resuming after drops
  droid keys create | ls | revoke
  droid webhooks add | ls | test | deliveries
  droid serve                     serve, as `droid` alone does
URL and key: --url / DROID_URL and --api-key / DROID_API_KEY, else what `droid login` kept.
Exit codes of the commands: 0 ok, 1 the task failed, 2 bad usage, 3 the task was cancelled,
4 not logged in or the key was refused, 5 not found, 6 conflict, 7 other refusal by the
server, 8 the server could not be reached, 130 interrupted (Ctrl-C).
"""


def parse_args(argv: list[str] | None = None, prog: str = "droid") -> argparse.Namespace:
    description = ("Droid: tasks for AI agents over a REST API, with live Socket.IO events\n"
                   "and a demo page at /. Serves until SIGTERM or SIGINT.")
    if prog == "droid":
        description += "\n" + COMMANDS
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HELP,
        description=description)
    parser.add_argument("--version", action="version", version=f"droid {__version__}")
    return parser.parse_args(argv)


# The accept queue's length (the kernel caps it at net.core.somaxconn). Tornado's default is
# 128, Node's 511. When many clients connect or reconnect at once, a full queue drops their
# handshakes and each waits a second or more for its SYN to be retried (1,000 WebSocket
# handshakes at once: 1,750-2,700 drops with 128, 10-120 with 511, none with 1024).
LISTEN_BACKLOG = 1024


def listen(config) -> list:
    """Bind HOST:PORT before anything else starts; ConfigError names the address."""
    try:
        return tornado.netutil.bind_sockets(config.port, config.host, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        host = f"[{config.host}]" if ":" in config.host else config.host
        reason = (exc.strerror or str(exc)).lower()
        raise ConfigError(f"cannot listen on {host}:{config.port}: {reason} "
                          "(set PORT or HOST)") from None


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop DROID_EVENT_LOOP asks for: uvloop's (libuv's) by default where it is
    installed, asyncio's own otherwise (None). Under a reconnect storm of 15,000 sockets uvloop
    keeps events to steady sockets within 10 ms at p99 where asyncio's loop took 16 ms: libuv runs
    due timers first in each turn, asyncio after the turn's I/O callbacks (bench/RESULTS.md)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("DROID_EVENT_LOOP=uvloop, but uvloop is not installed "
                              "(pip install uvloop, or set DROID_EVENT_LOOP=asyncio)") from None
        return None
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    module = type(loop).__module__.split(".")[0]
    if module == "uvloop":
        import uvloop
        return f"uvloop {uvloop.__version__}"
    return "asyncio"


async def serve(config) -> None:
    from .app import make_app
    from .http.listener import raise_descriptor_limit

    # Every connection is a descriptor; the soft limit is often 1,024 where the hard one is far
    # higher. The connection cap (DROID_MAX_CONNECTIONS) is taken under the raised limit.
    before, limit = raise_descriptor_limit()
    sockets = listen(config)
    describe_storage(config)
    config = keep_generated_secret(config)
    droid = await make_app(config)
    await droid.start(sockets)
    # What start-up built lives as long as the process, and so do most of a socket's objects:
    # full collections run in small steps (droid/collector.py).
    Collector().start()
    if config.jwt_secret_generated and not config.jwt_public_key:
        if config.jwt_secret_kept:
            log.warning("JWT_SECRET is not set: using a random key kept in %s (development "
                        "only; set JWT_SECRET in production)", config.jwt_secret_kept)
        else:
            log.warning("JWT_SECRET is not set: using a random key for this process; tokens "
                        "die with it (development only)")
    if not config.llm_base_url:
        log.info("LLM_BASE_URL is not set: tasks run on the built-in demo agent")
    if config.redis_url:
        log.info("REDIS_URL is set: events and connection counts are shared through Redis")
    log.info("Droid listening on http://%s:%d (env %s, worker concurrency %d)", config.host,
             droid.port, config.env, config.worker_concurrency)
    log.info("event loop: %s", loop_name(asyncio.get_running_loop()))
    log.info("descriptor limit %d%s; at most %d connections open at once", limit,
             f" (raised from {before})" if limit != before else "",
             droid.listener.max_connections)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await droid.stop()
    log.info("stopped")


def main(argv: list[str] | None = None, prog: str = "droid") -> None:
    parse_args(argv, prog)
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"droid: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # python-socketio and python-engineio give their loggers a stderr handler of their own
    # unless a level is set already, which printed each of their errors twice (theirs, then
    # ours). Their own level (ERROR), set first: their lines go through the handler above, once.
    for name in ("socketio.server", "engineio.server"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(config.event_loop)) as runner:
            runner.run(serve(config))
    except ConfigError as exc:
        print(f"droid: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (OSError, StoreUnavailable) as exc:
        print(f"droid: cannot start: {exc}", file=sys.stderr)
        sys.exit(1)

