"""A MongoDB server for tests: a throwaway SecantusDB process, or a real MongoDB by URI.

No `mongod` can be installed on the machines that run these tests, but SecantusDB (PyPI
`secantusdb`) speaks MongoDB's wire protocol. It is GPL-2.0, so it is only ever run as a separate
process from its own virtual environment, `.venv-secantus` (tests/run creates it); nothing in
droid/ or .venv imports it. When DROID_TEST_MONGODB_URI is set, that server is used instead.

SecantusDB ignores SIGTERM, so it is stopped with SIGKILL by its PID. Its `:memory:` storage is a
temporary directory it removes only on a clean shutdown, so it is given a directory of ours,
removed after the kill.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import tempfile
import time
from typing import Iterator

import pymongo
from pymongo.errors import PyMongoError

from redis_server import die_with_parent, free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXECUTABLE = ROOT / ".venv-secantus" / "bin" / "secantusd-py"
URI_ENV = "DROID_TEST_MONGODB_URI"


class SecantusServer:
    """One secantusd-py process on 127.0.0.1, a free port and a temporary storage directory.

    By default it answers `hello` as a single-node replica set (so it has transactions);
    `standalone=True` makes it a standalone server, which a MongoStore takes for one without
    transactions (droid/store/mongo/connection.py)."""

    def __init__(self, *, standalone: bool = False) -> None:
        self.standalone = standalone
        if not os.access(EXECUTABLE, os.X_OK):
            raise RuntimeError(f"SecantusDB is not installed ({EXECUTABLE} is missing): run "
                               f"tests/run, which installs it into .venv-secantus")
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="droid-secantus-")
        self.log_path = pathlib.Path(self.dir.name) / "secantusd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers a ping."""
        storage = pathlib.Path(self.dir.name) / "data"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(EXECUTABLE), "--host", "127.0.0.1", "--port", str(self.port),
                 "--storage-path", str(storage), "--log-level", "WARNING",
                 *(["--standalone"] if self.standalone else [])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.dir.name, preexec_fn=die_with_parent())
        deadline = time.monotonic() + timeout
        with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=250,
                                 connectTimeoutMS=250) as client:
            while True:
                try:
                    client.admin.command("ping")
                    return
                except PyMongoError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"secantusd-py exited with code {self.proc.returncode}:"
                                           f" {self.log_tail()}") from None
                    if time.monotonic() > deadline:
                        raise RuntimeError("secantusd-py did not answer a ping in time") from None
                    time.sleep(0.05)

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """SIGKILL by PID (SIGTERM is ignored), then remove the storage directory."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        self.dir.cleanup()


@contextlib.contextmanager
def mongodb_uri(*, standalone: bool = False) -> Iterator[str]:
    """DROID_TEST_MONGODB_URI when set, else the URI of a SecantusDB started for the block
    (`standalone`: one without transactions; a real MongoDB given by URI is what it is).

    Raises RuntimeError (never skips) when SecantusDB is needed and not installed.
    """
    uri = os.environ.get(URI_ENV)
    if uri:
        yield uri
        return
    server = SecantusServer(standalone=standalone)
    try:
        server.start()
        yield server.uri
    finally:
        server.close()
