"""What Heroku needs and does: the files its Python buildpack reads, and the Procfile's `web`
line run by a Procfile runner (honcho) with PORT set, as Heroku's dyno manager would."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from droid.config import load_config
from redis_server import die_with_parent, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = os.path.dirname(sys.executable)
SCRUB = ("MONGODB_", "LLM_", "REDIS_", "JWT_", "DROID_", "WORKER_", "TASK_", "CORS_", "METRICS_",
         "PYTHONPATH")
# The buildpack refuses an app with none, or with more than one, of these at the root.
PACKAGE_MANAGER_FILES = ("requirements.txt", "uv.lock", "poetry.lock", "Pipfile.lock")


def test_exactly_one_package_manager_file_pins_every_dependency():
    present = [name for name in PACKAGE_MANAGER_FILES if (ROOT / name).exists()]
    assert present == ["requirements.txt"]
    lines = [line.split("#")[0].strip() for line in
             (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line]
    assert "." in requirements  # Droid itself, with the pinned versions of what it needs
    pinned = {re.split(r"==", line)[0].lower() for line in requirements if "==" in line}
    assert all("==" in line for line in requirements if line != "."), requirements
    setup = (ROOT / "setup.cfg").read_text()
    needed = re.search(r"install_requires =\n((?:    .*\n)+)", setup).group(1).splitlines()
    needed = [line.split(";")[0].strip() for line in needed]  # environment markers left out
    names = {re.split(r"[\[<>=!~ ]", item)[0].lower().replace("_", "-") for item in needed
             if re.match(r"[A-Za-z]", item)}
    assert names <= pinned, f"not pinned in requirements.txt: {names - pinned} " \
                            "(regenerate it: see its first lines)"


def test_python_version_and_app_json_say_what_heroku_reads():
    assert (ROOT / ".python-version").read_text().strip() == "3.11"
    app = json.loads((ROOT / "app.json").read_text())
    plans = [a["plan"] if isinstance(a, dict) else a for a in app["addons"]]
    assert [p for p in plans if p.split(":")[0] == "heroku-redis"], plans  # sets REDIS_URL
    env = app["env"]
    for name in ("MONGODB_URI", "CORS_ORIGIN"):  # asked for, nothing to guess
        assert env[name].get("required") is True and "value" not in env[name], name
    for name in ("JWT_SECRET", "METRICS_TOKEN"):
        assert env[name].get("generator") == "secret", name
    assert env["DROID_ENV"]["value"] == "production"
    assert env["REDIS_TLS_VERIFY"]["value"] == "false"  # Heroku Redis: self-signed TLS
    assert env["DROID_TRUSTED_PROXIES"]["value"] == "*"  # the router's X-Forwarded-For
    for name, spec in env.items():  # every value given is one Droid accepts
        if "value" in spec:
            load_config({name: spec["value"], "MONGODB_URI": "mongodb://h/db",
                         "JWT_SECRET": "x" * 64}, dotenv_path=None)
    assert (ROOT / "Procfile").read_text().strip() == "web: python -m droid"


def _health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as reply:
            return json.loads(reply.read())
    except (OSError, urllib.error.HTTPError, ValueError):
        return None


def test_the_procfile_web_line_serves_on_port(tmp_path):
    honcho = shutil.which("honcho", path=BIN)
    assert honcho, "honcho is not installed (pip install -e '.[test]')"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB)
           and k not in ("HOST", "PORT", "LOG_LEVEL")}
    # `python` on PATH is this environment's, as the buildpack's is on a dyno; the data folder
    # is the test's (the Procfile runs in the app's root).
    env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), PORT=str(port),
               DROID_DATA_DIR=str(tmp_path / "data"))
    no_env_file = tmp_path / "empty.env"
    no_env_file.write_text("")
    log_path = tmp_path / "honcho.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([honcho, "--no-colour", "-e", str(no_env_file), "-f",
                                 str(ROOT / "Procfile"), "-d", str(ROOT), "start", "web"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())
    try:
        deadline = time.monotonic() + 60
        while (health := _health(f"http://127.0.0.1:{port}")) is None:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "no /health in time\n" + log_path.read_text()
            time.sleep(0.1)
        assert health["status"] == "ok" and health["db"] == "ok"
        # Stopped as a dyno is: SIGTERM to the process group. honcho's exit code is the shell's
        # that runs the Procfile line (sh -c: killed by the signal, 143); Droid's own clean
        # stop shows in its log.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, 128 + signal.SIGTERM), log_path.read_text()
        output = log_path.read_text()
        assert f"listening on http://0.0.0.0:{port}" in output, output
        assert "INFO droid: shutting down" in output and "INFO droid: stopped" in output, output
        assert "Traceback" not in output and " ERROR " not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
