"""The command line: --help and --version answer without starting, and every start-up error an
operator must fix (a bad value, a port that cannot be listened on) is one line on stderr, exit 2."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from droid import __version__

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
