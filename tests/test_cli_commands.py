"""The `droid` command line against real `python -m droid` processes, run in a real
pseudo-terminal (pexpect) or piped: `droid run` streaming its answer under a live status line
and exiting with the task's outcome, Ctrl-C asking whether to cancel, `droid tail` resuming after
the server restarts, `--json` output parsed, one-line errors with their exit codes, help texts.

`droid login`, `keys` and `webhooks` are in tests/test_client_keys_webhooks.py (issue 23)."""
from __future__ import annotations

import json
import re
import time

import pytest
from click.testing import CliRunner

from cli_helpers import cli_env, finish, register, run_cli, shown, spawn_cli, start
from droid.cli import cli
from droid.client import Client
from droid_process import spawn  # noqa: F401  (fixture)
from redis_server import free_port
from tests.fake_llm import refused_url

TIMEOUT = 30


def test_help_texts(tmp_path):
    env = cli_env(tmp_path)
    top = run_cli(["--help"], env)
    assert top.returncode == 0 and top.stdout.startswith("usage: droid")
    for command in ("droid login", "droid run", "droid tail", "droid keys", "droid webhooks",
                    "Exit codes", "130 interrupted"):
        assert command in top.stdout, command
    expected = {
        ("run", "--help"): ["PROMPT", "--agent", "--priority", "--metadata", "--no-wait",
                            "--json", "DROID_API_KEY", "Exits 0"],
        ("login", "--help"): ["--api-key", "--email", "config"],
        ("logout", "--help"): ["revoke"],
        ("tasks", "--help"): ["ls", "show", "cancel"],
        ("tasks", "ls", "--help"): ["--status", "--limit", "--json"],
        ("tasks", "show", "--help"): ["ID"],
        ("tasks", "cancel", "--help"): ["ID"],
        ("tail", "--help"): ["--after", "SEQ", "Ctrl-C"],
        ("keys", "--help"): ["create", "ls", "revoke"],
        ("keys", "create", "--help"): ["--scope"],
        ("webhooks", "--help"): ["add", "ls", "test", "deliveries"],
        ("webhooks", "add", "--help"): ["--event", "URL"],
        ("webhooks", "deliveries", "--help"): ["--status"],
    }
    serve = run_cli(["serve", "--help"], env)
    assert serve.returncode == 0 and serve.stdout.startswith("usage: droid serve")
    # In this process (warnings are errors here: click warns about clashing parameter names),
    # but one of them as a user runs it too.
    runner = CliRunner()
    for args, words in expected.items():
        result = runner.invoke(cli, list(args), prog_name="droid", env=env)
        assert result.exit_code == 0, (args, result.output, result.exception)
        for word in words:
            assert word in result.stdout, (args, word, result.stdout)
    installed = run_cli(["webhooks", "add", "--help"], env)
    assert installed.returncode == 0 and installed.stderr == "", installed.stderr
    assert installed.stdout.startswith("Usage: droid webhooks add [OPTIONS] URL")
    unknown = run_cli(["frobnicate"], env)
    assert unknown.returncode == 2 and "No such command 'frobnicate'" in unknown.stderr


def test_run_streams_the_answer_under_a_live_status_line_and_exits_0(tmp_path, spawn):
    droid = start(spawn, DROID_DEMO_DELAY_S="2")  # eight pieces over two seconds
    user = register(droid.url)
    child = spawn_cli(["run", "Write a haiku about the sea", "--priority", "high"],
                      cli_env(tmp_path, droid.url, DROID_API_KEY=user["token"]))
    child.expect("processing", timeout=TIMEOUT)  # the status line, before the answer
    child.expect("built-in demo agent", timeout=TIMEOUT)
    first_piece = time.monotonic()
    child.expect("restart Droid", timeout=TIMEOUT)
    child.expect("completed in", timeout=TIMEOUT)
    done = time.monotonic()
    assert finish(child) == 0
    assert done - first_piece > 0.5, "the answer came at once, not as it streamed"
    screen = shown(child)
    assert re.search(r"✔ completed in [\d.]+ s · \d+ tokens · task [0-9a-f-]{36}", screen), screen
    with Client(droid.url, token=user["token"]) as client:
        (task,) = client.tasks.list()
    assert task["status"] == "completed" and task["priority"] == "high"


def test_run_piped_writes_the_answer_alone_on_stdout(tmp_path, spawn):
    droid = start(spawn, DROID_DEMO_DELAY_S="0.1")
    user = register(droid.url)
    result = run_cli(["run", "-", "--metadata", '{"ticket": 7}'],
                     cli_env(tmp_path, droid.url, DROID_API_KEY=user["token"]),
                     input="a prompt from stdin")
    assert result.returncode == 0, result.stderr
    with Client(droid.url, token=user["token"]) as client:
        (task,) = client.tasks.list()
    assert result.stdout == task["response"] + "\n"  # no colour, no status
    assert task["prompt"] == "a prompt from stdin" and task["metadata"] == {"ticket": 7}
    assert "\x1b[" not in result.stdout + result.stderr
    assert f"task {task['id']} pending" in result.stderr and "completed" in result.stderr


def test_run_of_a_failing_task_exits_1(tmp_path, spawn):
    droid = start(spawn, LLM_BASE_URL=refused_url(), LLM_MODEL="m", TASK_MAX_RETRIES="0")
    user = register(droid.url)
    child = spawn_cli(["run", "nobody answers"],
                      cli_env(tmp_path, droid.url, DROID_API_KEY=user["token"]))
    child.expect("failed", timeout=TIMEOUT)
    assert finish(child) == 1


@pytest.mark.parametrize("answer", ["y", "n"])
def test_ctrl_c_asks_whether_to_cancel_the_task(tmp_path, spawn, answer):
    droid = start(spawn, DROID_DEMO_DELAY_S="12")  # a piece every 1.5 s
    user = register(droid.url)
    child = spawn_cli(["run", "take your time"],
                      cli_env(tmp_path, droid.url, DROID_API_KEY=user["token"]))
    child.expect("processing", timeout=TIMEOUT)
    child.expect("built-in demo agent", timeout=TIMEOUT)  # its first piece
    child.sendintr()
    child.expect(r"Cancel task [0-9a-f-]{36}\? \[y/N\]", timeout=TIMEOUT)
    child.sendline(answer)
    child.expect("cancelled" if answer == "y" else "keeps running", timeout=TIMEOUT)
    assert finish(child) == 130
    with Client(droid.url, token=user["token"]) as client:
        (task,) = client.tasks.list()
        assert task["status"] == ("cancelled" if answer == "y" else "processing")
        if answer == "n":
            client.tasks.cancel(task["id"])


def test_tail_resumes_after_the_server_restarts(tmp_path, spawn):
    """`droid tail --after 0` in a terminal: the server is SIGKILLed and started again on the
    same port and data folder; tail says it is reconnecting, comes back by itself and shows
    every seq once, in order, until Ctrl-C."""
    work = tmp_path / "work"
    first = start(spawn, "first", workdir=work, WORKER_CONCURRENCY="0")
    user = register(first.url)
    child = spawn_cli(["tail", "--after", "0"],
                      cli_env(tmp_path, first.url, DROID_API_KEY=user["token"]))
    child.expect("following events after seq 0", timeout=TIMEOUT)
    with Client(first.url, token=user["token"]) as client:
        for i in range(2):
            client.tasks.create(f"before {i}")
    child.expect(r"\s2 +\d{4}-\d\d-\d\d [\d:]+ +task\.created", timeout=TIMEOUT)
    first.kill()
    child.expect("reconnecting in", timeout=TIMEOUT)
    second = start(spawn, "second", workdir=work, port=first.port, WORKER_CONCURRENCY="0")
    with Client(second.url, token=user["token"]) as client:
        for i in range(2):
            client.tasks.create(f"after {i}")
    child.expect("'after 1'", timeout=TIMEOUT)
    child.sendintr()
    assert finish(child) == 130
    screen = shown(child)
    seqs = [int(m) for m in re.findall(r"^\s*(\d+) +\d{4}-\d\d-\d\d", screen, re.M)]
    assert seqs == [1, 2, 3, 4], screen
    assert "'before 0'" in screen and "connection lost" in screen


def test_json_output_one_object_per_line(tmp_path, spawn):
    droid = start(spawn, DROID_DEMO_DELAY_S="0.1")
    user = register(droid.url)
    env = cli_env(tmp_path, droid.url, DROID_API_KEY=user["token"])
    result = run_cli(["run", "json please", "--json"], env)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    task = lines[-1]
    assert task["status"] == "completed"
    events = [line["event"] for line in lines[:-1]]
    assert events[0] == "task.created" and events[-1] == "task.completed", events
    assert "task.progress" in events and "task.processing" in events
    assert all(line["data"]["taskId"] == task["id"] for line in lines[:-1])

    queued = run_cli(["run", "later", "--no-wait", "--json"], env)
    assert queued.returncode == 0
    (created,) = [json.loads(line) for line in queued.stdout.splitlines()]
    assert created["prompt"] == "later" and created["status"] == "pending"

    listed = run_cli(["tasks", "ls", "--json"], env)
    ids = [json.loads(line)["id"] for line in listed.stdout.splitlines()]
    assert ids == [created["id"], task["id"]]
    shown = run_cli(["tasks", "show", task["id"], "--json"], env)
    assert json.loads(shown.stdout) == {**task, "updatedAt": json.loads(shown.stdout)[
        "updatedAt"]}
    human = run_cli(["tasks", "ls", "--status", "completed"], env)
    assert human.stdout.splitlines()[0].split("\t")[:2] == ["ID", "STATUS"]
    assert f"{task['id']}\tcompleted\tnormal\t" in human.stdout


def test_errors_are_one_line_with_distinct_exit_codes(tmp_path, spawn):
    droid = start(spawn, DROID_DEMO_DELAY_S="0.05")
    user = register(droid.url)
    env = cli_env(tmp_path, droid.url, DROID_API_KEY=user["token"])
    with Client(droid.url, token=user["token"]) as client:
        task = client.tasks.create("done soon")
        client.tasks.wait(task["id"], timeout=TIMEOUT)
    cases = [
        (["tasks", "show", "00000000-0000-4000-8000-0000000000ff"], env, 5, "Task not found"),
        (["tasks", "cancel", task["id"]], env, 6, "already completed"),
        (["run", "x", "--metadata", "[1, 2]"], env, 2, "--metadata must be a JSON object"),
        (["run", "x", "--priority", "soon"], env, 2, "Invalid value for '--priority'"),
        (["tasks", "ls"], {**env, "DROID_API_KEY": "droid_sk_revoked"}, 4, "droid login"),
        (["tasks", "ls"], cli_env(tmp_path, droid.url), 4, "not logged in"),
        (["tasks", "ls"], {**env, "DROID_URL": f"http://127.0.0.1:{free_port()}"}, 8,
         "cannot reach"),
        (["run", "x" * 40_000], env, 7, "prompt"),
    ]
    for args, case_env, code, says in cases:
        result = run_cli(args, case_env)
        assert result.returncode == code, (args, result.returncode, result.stderr)
        assert says in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        if code not in (2,):
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert result.stderr.startswith("droid: ")
