"""The command line: --help and --version answer without starting, and every start-up error an
operator must fix is one line on stderr: exit 2 for a bad value or a port that cannot be listened
on, exit 1 for a database that cannot be opened."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from droid import __version__
from redis_server import die_with_parent, free_port

BIN = os.path.dirname(sys.executable)


def run(args: list[str], tmp_path, **env: str) -> subprocess.CompletedProcess:
    """`python -m droid ARGS` from an empty folder (no .env), with Droid's variables cleared."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("DROID_", "MONGODB", "JWT_", "LLM_", "REDIS", "METRICS"))
             and k not in ("PORT", "HOST", "CORS_ORIGIN", "LOG_LEVEL")}
    clean.update(DROID_DATA_DIR=str(tmp_path / "data"), **env)
    return subprocess.run([sys.executable, "-m", "droid", *args], env=clean, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def busy_port():
    """A port that something else already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_help_prints_usage_and_the_variables_without_starting(tmp_path, busy_port):
    # Were it to start, it would meet the busy port and exit 2.
    result = run(["--help"], tmp_path, HOST="127.0.0.1", PORT=str(busy_port))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: droid")
    for name in ("PORT", "MONGODB_URI", "JWT_SECRET", "LLM_MODEL", "METRICS_TOKEN", "--version"):
        assert name in result.stdout, name
    assert result.stderr == ""
    assert not (tmp_path / "data").exists()


def test_version_prints_the_version_without_starting(tmp_path, busy_port):
    result = run(["--version"], tmp_path, HOST="127.0.0.1", PORT=str(busy_port))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"droid {__version__}\n", "")


def test_the_console_script_answers_too(tmp_path):
    script = shutil.which("droid", path=BIN)
    assert script, "the droid console script is not installed (pip install -e .)"
    result = subprocess.run([script, "--version"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout) == (0, f"droid {__version__}\n")


def test_an_unknown_option_is_refused_with_exit_code_2(tmp_path):
    result = run(["--port", "80"], tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --port" in result.stderr


def test_a_port_in_use_names_the_address_and_exits_2(tmp_path, busy_port):
    result = run([], tmp_path, HOST="127.0.0.1", PORT=str(busy_port))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{busy_port}" in lines[0] and "already in use" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_host_that_is_not_here_names_the_address_and_exits_2(tmp_path):
    result = run([], tmp_path, HOST="203.0.113.7", PORT="3000")  # TEST-NET-3: on no machine
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "203.0.113.7:3000" in lines[0], result.stderr


def test_llm_base_url_without_llm_model_stops_start_up(tmp_path):
    result = run([], tmp_path, LLM_BASE_URL="http://127.0.0.1:9/v1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "LLM_MODEL" in lines[0], result.stderr


def _last_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_mongodb_that_does_not_answer_is_one_line_without_the_password(tmp_path):
    port = free_port()  # nothing listens there
    result = run([], tmp_path, HOST="127.0.0.1", PORT="0",
                 MONGODB_URI=f"mongodb://ada:s3cret@127.0.0.1:{port}/droid")
    assert result.returncode == 1, result.stderr
    line = _last_line(result)
    assert line.startswith(f"droid: cannot start: MongoDB at 127.0.0.1:{port} cannot be used"), line
    assert "s3cret" not in result.stderr and "Topology" not in line


@pytest.mark.parametrize("kind", ["a file", "a folder where the database file goes",
                                  "not a database"])
def test_a_data_folder_droid_cannot_use_is_one_line_naming_droid_data_dir(tmp_path, kind):
    data = tmp_path / "data"
    if kind == "a file":
        data.write_text("not a folder")
        code, says = 2, "configuration error: DROID_DATA_DIR"
    elif kind == "a folder where the database file goes":
        (data / "droid.sqlite3").mkdir(parents=True)
        code, says = 1, "cannot start: cannot open the SQLite store"
    else:
        data.mkdir()
        (data / "droid.sqlite3").write_bytes(b"this is not an SQLite file at all. " * 10)
        code, says = 1, "cannot start: cannot open the SQLite store"
    result = run([], tmp_path, HOST="127.0.0.1", PORT="0")
    assert result.returncode == code, result.stderr
    line = _last_line(result)
    assert line.startswith(f"droid: {says}") and "DROID_DATA_DIR" in line, line


def test_library_errors_and_a_refused_origin_are_logged_once(tmp_path):
    """Through the process's own logging set-up: python-engineio's errors are not printed twice
    (once by a handler of its own), and a refused origin is one WARNING line with the origin."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DROID_", "MONGODB", "JWT_", "LLM_", "REDIS", "METRICS"))
           and k not in ("PORT", "HOST", "CORS_ORIGIN", "LOG_LEVEL")}
    env.update(HOST="127.0.0.1", PORT=str(port), DROID_DATA_DIR=":memory:",
               CORS_ORIGIN="http://good.example")
    log_path = tmp_path / "droid.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "droid"], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                urllib.request.urlopen(base + "/health", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        for path, headers in (("/socket.io/?EIO=4&transport=polling", {"Origin": "http://evil.example"}),
                              ("/socket.io/?EIO=4&transport=polling&sid=nope", {})):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(urllib.request.Request(base + path, headers=headers),
                                       timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = log_path.read_text().splitlines()
    origin = [line for line in lines if "http://evil.example" in line]
    assert len(origin) == 1 and " WARNING droid.cors: " in origin[0], lines
    session = [line for line in lines if "Invalid session nope" in line]
    assert len(session) == 1 and " ERROR engineio.server: " in session[0], lines
