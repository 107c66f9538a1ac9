"""The package as users install it: a wheel built from the sources, installed non-editable into
a fresh virtual environment (no system site-packages, dependencies through pip as a user gets
them), whose `droid` command, started from an unrelated folder, serves the demo page, app.js
and the vendored Socket.IO client (setup.cfg ships the repository's static/ as droid/static),
and, as a client of that server, runs a task (`droid run`, and droid.client from the wheel).

The install fetches Droid's dependencies through pip (from its cache when they are there), so
this is the slowest test of the suite; it is what `pip install .` in the README does.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from redis_server import die_with_parent, free_port

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "droid", "static")
SCRUB = ("MONGODB_", "LLM_", "REDIS_", "JWT_", "DROID_", "WORKER_", "TASK_", "CORS_", "METRICS_",
         "PYTHON", "VIRTUAL_ENV")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(SCRUB) and k not in ("HOST", "PORT", "LOG_LEVEL")}
    env.update(extra)
    return env


def run(args: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=timeout, **kw)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def shipped_files() -> list[str]:
    """What the wheel must carry: every module of droid/ and every file of static/."""
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "droid").rglob("*.py")
               if "__pycache__" not in p.parts]
    assets = ["droid/static/" + p.relative_to(ROOT / "static").as_posix()
              for p in (ROOT / "static").rglob("*") if p.is_file()]
    return modules + assets


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built by `python -m build` from a copy of the sources (the work tree stays clean
    of build/ and egg-info)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    run([sys.executable, "-m", "build", "--wheel", "--outdir", base / "dist", src], timeout=600,
        env=clean_env())
    (built,) = (base / "dist").glob("droid-*.whl")
    return built


def test_the_wheel_carries_every_module_and_every_static_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in shipped_files() if f not in names]
    assert missing == [], f"not in the wheel: {missing} (setup.cfg packages / package_data)"
    assert "droid/static/vendor/socket.io-client.LICENSE" in names
    assert not [n for n in names if n.startswith(("static/", "tests/"))]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "droid = droid.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_for_health(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"droid exited with {proc.returncode}"
        try:
            if get(url + "/health")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "droid did not answer /health in time"
        time.sleep(0.1)


def check_the_client_and_the_command_line(venv: Path, url: str, cwd: Path) -> None:
    """The installed `droid` command runs a task on the server it started (`droid run`, piped:
    JSON lines), and droid.client imports from the wheel."""
    request = urllib.request.Request(
        url + "/auth/register", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"email": "pkg@example.com", "password": "correct horse"}).encode())
    with urllib.request.urlopen(request, timeout=10) as reply:
        token = json.load(reply)["accessToken"]
    env = clean_env(DROID_URL=url, DROID_API_KEY=token, HOME=str(cwd),
                    XDG_CONFIG_HOME=str(cwd / "config"))
    usage = run([venv / "bin" / "droid", "--help"], timeout=60, cwd=cwd, env=env).stdout
    assert "droid run" in usage and "droid tail" in usage
    ran = run([venv / "bin" / "droid", "run", "packaged", "--json"], timeout=120, cwd=cwd,
              env=env)
    assert json.loads(ran.stdout.splitlines()[-1])["status"] == "completed", ran.stdout
    code = ("import droid.client, sys; "
            "assert droid.client.__file__.startswith(sys.prefix), droid.client.__file__; "
            "from droid.client import Client, AsyncClient, verify_webhook; "
            "print(Client().tasks.get(sys.argv[1])['status'])")
    task_id = json.loads(ran.stdout.splitlines()[-1])["id"]
    shown = run([venv / "bin" / "python", "-c", code, task_id], timeout=60, cwd=cwd, env=env)
    assert shown.stdout.strip() == "completed"


def test_the_installed_wheel_serves_the_page_from_any_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=120)
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", wheel], timeout=1200, env=clean_env())
    where = run([python, "-c", "import droid; print(droid.__file__)"], timeout=60,
                cwd=tmp_path, env=clean_env()).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel, not the source tree

    elsewhere = tmp_path / "elsewhere"  # no static/, no droid/, no .env
    elsewhere.mkdir()
    port = free_port()
    log_path = tmp_path / "droid.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(venv / "bin" / "droid")], cwd=elsewhere, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(),
            env=clean_env(HOST="127.0.0.1", PORT=str(port), DROID_DEMO_DELAY_S="0.2",
                          DROID_DATA_DIR=str(tmp_path / "data")))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc)
        status, headers, body = get(url + "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert body == (ROOT / "static" / "index.html").read_bytes()
        for path, source in (("/static/app.js", "app.js"),
                             ("/static/vendor/socket.io.min.js", "vendor/socket.io.min.js"),
                             ("/static/vendor/socket.io-client.LICENSE",
                              "vendor/socket.io-client.LICENSE")):
            status, _, body = get(url + path)
            assert status == 200, path
            assert body == (ROOT / "static" / source).read_bytes(), path
        status, headers, body = get(url + "/static/missing.js")
        assert status == 404 and json.loads(body)["statusCode"] == 404
        check_the_client_and_the_command_line(venv, url, elsewhere)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        print(log_path.read_text(errors="replace"))
