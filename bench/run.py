#!/usr/bin/env python3
"""Droid against two Node socket.io references, side by side, on this machine: one command.

    python bench/run.py            # 3 alternating runs of every workload (about 20 minutes)
    python bench/run.py --quick    # 1 short run with few sockets (under a minute)

Each server (Droid through bench/droid_server.py; the reference, bench/reference/server.js on
socket.io as shipped; the native reference, the same server.js on the packages of
bench/reference-native/: socket.io with ws's native helpers bufferutil and utf-8-validate) runs
pinned to CPU 0 and the one load generator (bench/reference/loadgen.js: node, socket.io-client,
WebSocket transport, offering per-message deflate) to CPU 1. Every workload group gets a fresh
server process; the servers alternate within each run (Droid, reference, native in odd runs,
the reverse in even ones). The table shows the median over the runs and the ratios
Droid / each reference of those medians; the JSON with every run's raw figures goes to
bench/results/. bench/README.md explains each workload and how to read the ratios.

Only the standard library is used here; Droid itself runs on the project's virtual environment
(.venv/bin/python when present, else this interpreter). The references' npm packages are
installed with `npm ci` from their package-lock.json files when they are missing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
REFERENCE = BENCH / "reference"
NATIVE = BENCH / "reference-native"  # the same server.js on socket.io + ws's native helpers
RESULTS = BENCH / "results"
SECRET = "droid-bench-only-secret-0123456789abcdef"  # HS256 key shared by servers and load generator
SERVERS = ("droid", "reference", "native")
REFERENCES = ("reference", "native")
TITLES = {"droid": "Droid", "reference": "Node reference", "native": "Node + native ws"}
SERVER_CPU, LOADGEN_CPU = "0", "1"
NOISE_PCT = 15.0  # other processes using more than this much of the server's core spoil a figure

# Workload sizes. Sockets belong to users two by two (2,000 sockets of 1,000 users).
FULL = {
    "runs": 3, "small": 2000, "large": 5000, "concurrency": 100,
    "fanout": {"warmupS": 1.0, "durationS": 5.0, "chunk": 250, "windowChunks": 8, "requests": 2},
    "latency": {"rate": 500, "durationS": 10.0},
    "churn": {"cycles": 10, "sockets": 500, "users": 250, "settleS": 30},
    "e2e_latency": {"requests": 200, "sockets": 2},
    "e2e_throughput": {"tasks": 1000, "users": 10, "socketsPerUser": 2, "concurrency": 16},
    "session_timeout_s": 300,
}
QUICK = {
    "runs": 1, "small": 200, "large": 500, "concurrency": 50,
    "fanout": {"warmupS": 0.5, "durationS": 2.0, "chunk": 50, "windowChunks": 8, "requests": 2},
    "latency": {"rate": 500, "durationS": 2.0},
    "churn": {"cycles": 3, "sockets": 100, "users": 50, "settleS": 0},
    "e2e_latency": {"requests": 30, "sockets": 2},
    "e2e_throughput": {"tasks": 100, "users": 5, "socketsPerUser": 2, "concurrency": 8},
    "session_timeout_s": 60,
}
SESSIONS = ("fanout", "connect-large", "churn", "e2e")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# preparation


def check_tools() -> None:
    missing = [t for t in ("node", "npm", "taskset") if shutil.which(t) is None]
    if missing:
        sys.exit(f"bench: {', '.join(missing)} not found on PATH (node 18+, npm, util-linux)")
    if (os.cpu_count() or 1) < 2:
        log("WARNING: fewer than 2 CPUs: server and load generator share one; figures mean little")


def ensure_node_packages(directory: Path = REFERENCE) -> None:
    """`npm ci` in a bench/reference* directory when its node_modules is missing or older than
    the lock."""
    marker = directory / "node_modules" / ".package-lock.json"
    lock = directory / "package-lock.json"
    if marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime:
        return
    log(f"installing the npm packages of {directory.name} (npm ci)")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=directory,
                   check=True)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 12000:
        log(f"WARNING: open-file limit {want} may be too low for 5,000 sockets on each side")


def busy_cpu_pct(seconds: float) -> float:
    """CPU used by the whole machine over `seconds`, in % of one core (from /proc/stat)."""
    def busy() -> float:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    b0, t0 = busy(), time.monotonic()
    time.sleep(seconds)
    return 100 * (busy() - b0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)


def wait_quiet(max_wait_s: float) -> float:
    """Wait (up to max_wait_s) until other processes leave the CPUs nearly idle; returns the
    last measured use. Between sessions no bench process runs, so all of it is someone else's."""
    deadline = time.monotonic() + max_wait_s
    while True:
        used = busy_cpu_pct(1.0)
        if used <= NOISE_PCT or time.monotonic() >= deadline:
            return used
        log(f"waiting for a quiet machine: other processes use {used:.0f}% of a core")
        time.sleep(2)


def python_for_droid() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


NICE = -15  # bench processes run at this niceness when allowed (root / CAP_SYS_NICE)
PRIORITY = {"on": True}


def favoured() -> None:
    """preexec_fn: raise the child's priority so that other processes disturb it less.

    The child is in a session of its own (start_new_session), so with the kernel's
    autogroup scheduling it is also in a scheduling group of its own; that group's niceness
    is what counts against other sessions' processes, the process's own only within it."""
    if not PRIORITY["on"]:
        return
    try:
        os.nice(NICE)
    except OSError:
        pass
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(NICE))
    except OSError:
        pass


LATENCY_PHASES = ("latency", "e2e-latency")


def realtime(pids: list[int], on: bool) -> None:
    """Switch every thread of these processes to SCHED_RR (on) or back to SCHED_OTHER.

    Used for the latency phases only: there the bench processes are mostly asleep and other
    processes' CPU use delays their wake-ups by milliseconds, niceness or not. Not for the
    saturation phases: the kernel keeps 5% of each second from real-time tasks."""
    if not PRIORITY["on"]:
        return
    policy, param = (os.SCHED_RR, os.sched_param(1)) if on else (os.SCHED_OTHER, os.sched_param(0))
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setscheduler(int(tid), policy, param)
            except OSError:
                pass


def cpu_pin(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if (os.cpu_count() or 1) >= 2 else []


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                          if l.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration):
        mem_kb = 0

    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    # which Droid was measured: the commit, and a digest of droid/*.py as they are (the working
    # tree may hold uncommitted changes)
    digest = hashlib.sha256()
    for path in sorted((ROOT / "droid").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = version(["git", "-C", str(ROOT), "status", "--porcelain", "--", "droid"]) != ""
    return {
        "droidCommit": commit, "droidUncommittedChanges": dirty,
        "droidSourceSha256": digest.hexdigest()[:16],
        "cpu": model, "cpus": os.cpu_count(), "memGb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(), "python": version([python_for_droid(), "--version"]),
        "node": version(["node", "--version"]),
        "packages": version([python_for_droid(), "-c",
                             "import importlib.metadata as m; print(', '.join(p + ' ' + "
                             "m.version(p) for p in ('python-socketio', 'python-engineio', "
                             "'tornado', 'orjson')))"]),
        "socketio": json.loads((REFERENCE / "node_modules" / "socket.io" / "package.json")
                               .read_text())["version"],
        "native": ", ".join(
            f"{name} {json.loads(path.read_text())['version']}"
            for name in ("socket.io", "ws", "bufferutil", "utf-8-validate")
            if (path := NATIVE / "node_modules" / name / "package.json").exists()),
    }


# ------------------------------------------------------------------------------------------
# processes


class Server:
    """One server process under test, pinned to SERVER_CPU; knows its port and pid."""

    def __init__(self, kind: str, log_path: Path) -> None:
        self.kind = kind
        env = dict(os.environ, PORT="0", HOST="127.0.0.1", JWT_SECRET=SECRET)
        if kind == "droid":
            # A fresh embedded store per server run (the fan-out workloads never touch it).
            env.update(LOG_LEVEL="WARNING", DROID_DEMO_DELAY_S="0", DROID_ENV="development",
                       DROID_DATA_DIR=str(log_path.parent / f"droid-data-{os.getpid()}-{id(self)}"),
                       # thousands of handshakes at once from one address, the load generator's
                       DROID_ANON_SESSIONS_PER_ADDRESS="1000000", DROID_ANON_SESSIONS="1000000")
            for name in ("MONGODB_URI", "REDIS_URL", "LLM_BASE_URL"):
                env.pop(name, None)
            cmd = [python_for_droid(), str(BENCH / "droid_server.py")]
            cwd = BENCH  # no stray .env from the repository root
        else:
            cmd = ["node", "--expose-gc", str(REFERENCE / "server.js")]
            cwd = REFERENCE
            if kind == "native":  # same server, socket.io + bufferutil/utf-8-validate from there
                env["BENCH_NODE_MODULES"] = str(NATIVE)
            else:
                env.pop("BENCH_NODE_MODULES", None)
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(cpu_pin(SERVER_CPU) + cmd, cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=self.log_file, bufsize=0,
                                     start_new_session=True, preexec_fn=favoured)
        line = read_line(self.proc, 30)
        if not line or not line.startswith("BENCH-READY"):
            self.stop()
            raise RuntimeError(f"{kind} server did not start (see {log_path}): {line!r}")
        fields = dict(f.split("=") for f in line.split()[1:])
        self.port, self.pid = int(fields["port"]), int(fields["pid"])
        self.native = fields.get("native")
        if kind == "native" and self.native in (None, "none"):
            self.stop()
            raise RuntimeError("the native reference runs without bufferutil/utf-8-validate")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """One line of a child's stdout, or None on timeout or end of output. The pipe must be
    unbuffered (bufsize=0): select() cannot see lines already read into a Python buffer."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return None
    line = proc.stdout.readline()
    return line.decode().strip() if line else None


def run_loadgen(server: Server, phases: list[dict], log_path: Path, timeout_s: float,
                on_phase: Any = None) -> dict[str, dict]:
    """Drive `server` through `phases`; returns {phase name: result}."""
    plan = {"url": server.url, "serverPid": server.pid, "serverCpu": int(SERVER_CPU), "secret": SECRET,
            "clkTck": os.sysconf("SC_CLK_TCK"), "phases": phases}
    results: dict[str, dict] = {}
    with open(log_path, "wb") as err:
        flags = os.environ.get("BENCH_LOADGEN_NODE_FLAGS", "").split()  # e.g. --cpu-prof
        proc = subprocess.Popen(cpu_pin(LOADGEN_CPU) + ["node", *flags, str(REFERENCE / "loadgen.js"),
                                                        json.dumps(plan)],
                                cwd=REFERENCE, stdout=subprocess.PIPE, stderr=err, bufsize=0,
                                start_new_session=True, preexec_fn=favoured)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                line = read_line(proc, max(0.1, deadline - time.monotonic()))
                if line is None:
                    if time.monotonic() >= deadline:
                        raise RuntimeError(f"load generator timed out after {timeout_s:.0f} s")
                    if proc.poll() is not None:
                        raise RuntimeError(f"load generator exited {proc.returncode} "
                                           f"(see {log_path})")
                    continue
                msg = json.loads(line)
                if msg["type"] == "phase-start":
                    realtime([server.pid, proc.pid], msg["phase"] in LATENCY_PHASES)
                    if on_phase is not None:
                        on_phase(msg["phase"])
                elif msg["type"] == "result":
                    results[msg["name"]] = msg["result"]
                    if msg["phase"] in LATENCY_PHASES:
                        realtime([server.pid, proc.pid], False)
                elif msg["type"] == "error":
                    raise RuntimeError(f"load generator failed: {msg['message']}")
                elif msg["type"] == "done":
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return results


def session_phases(session: str, p: dict) -> list[dict]:
    small, large, conc = p["small"], p["large"], p["concurrency"]
    if session == "fanout":
        return [{"type": "connect", "name": "connect-small", "sockets": small,
                 "users": small // 2, "concurrency": conc},
                {"type": "fanout", **p["fanout"], "receiver": p["receiver"]},
                {"type": "latency", **p["latency"]},
                {"type": "disconnect"}]
    if session == "connect-large":
        return [{"type": "connect", "name": "connect-large", "sockets": large,
                 "users": large // 2, "concurrency": conc},
                {"type": "disconnect"}]
    if session == "churn":
        return [{"type": "churn", **p["churn"], "concurrency": conc}]
    if session == "e2e":
        return [{"type": "e2e-latency", **p["e2e_latency"]},
                {"type": "e2e-throughput", **p["e2e_throughput"]}]
    raise ValueError(session)


class Profiler:
    """py-spy on the Droid server during its fan-out and e2e-throughput phases (--profile): the
    collapsed stacks (.txt, for profile_summary.py) or a flame graph (.svg). py-spy pauses the
    server for each of its 100 samples a second: do not take a profiled run's table as a
    baseline."""

    def __init__(self, out_dir: Path, seconds: float, fmt: str) -> None:
        self.out_dir, self.seconds = out_dir, seconds
        self.fmt = {"svg": ("flamegraph", "svg"), "raw": ("raw", "txt")}[fmt]
        self.procs: list[subprocess.Popen] = []
        self.exe = shutil.which("py-spy", path=str(ROOT / ".venv" / "bin")) or shutil.which("py-spy")
        if self.exe is None:
            sys.exit("bench: --profile needs py-spy (.venv/bin/pip install py-spy)")

    def hook(self, server: Server, tag: str) -> Any:
        def on_phase(phase: str) -> None:
            seconds = {"fanout": self.seconds, "e2e-throughput": 15, "connect": 8}.get(phase)
            if server.kind != "droid" or seconds is None:
                return
            out = self.out_dir / f"{tag}-{phase}.{self.fmt[1]}"
            self.procs.append(subprocess.Popen(
                [self.exe, "record", "--pid", str(server.pid), "--rate", "100",
                 "--duration", str(int(seconds)), "--format", self.fmt[0], "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=open(f"{out}.log", "wb"),
                start_new_session=True, preexec_fn=favoured))  # a starved sampler skews
            log(f"profiling Droid's {phase} into {out}")
        return on_phase

    def wait(self) -> None:
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


# ------------------------------------------------------------------------------------------
# figures

# (key, label, unit, better, goal): goal is the Droid/reference ratio the issue asks for.
ROWS = [
    ("fanout_msgs_per_s", "fan-out at saturation, delivered msgs/s", "msg/s", "higher", 1.0),
    ("fanout_msgs_per_cpu_s", "fan-out: delivered msgs per server CPU-second", "msg/CPU-s", "higher", None),
    ("rss_per_socket_small_kb", "server memory per idle socket ({small} sockets)", "KB", "lower", 1.0),
    ("latency_p50_ms", "latency p50 at {rate} events/s", "ms", "lower", None),
    ("latency_p99_ms", "latency p99 at {rate} events/s", "ms", "lower", 2.0),
    ("latency_max_ms", "latency max at {rate} events/s", "ms", "lower", None),
    ("connect_small_s", "connect {small} sockets", "s", "lower", 1.0),
    ("connect_large_s", "connect {large} sockets", "s", "lower", 1.0),
    ("connect_large_server_ms", "connect {large}: server CPU per socket", "ms", "lower", None),
    ("connect_large_loadgen_ms", "connect {large}: load generator CPU per socket", "ms", None,
     None),
    ("connect_large_server_cpu", "connect {large}: server CPU (of one core)", "%", None, None),
    ("connect_large_loadgen_cpu", "connect {large}: load generator CPU", "%", None, None),
    ("rss_per_socket_large_kb", "server memory per idle socket ({large} sockets)", "KB", "lower", 1.0),
    ("idle_rss_mb", "server memory at start", "MB", "lower", None),
    ("churn_retained_kb", "memory kept after {cycles} churn cycles of {csockets}", "KB", "lower", None),
    ("churn_retained_gc_kb", "  the same after a full GC", "KB", "lower", None),
    ("churn_retained_settled_kb", "  the same {settle} s later, after a full GC", "KB", "lower", None),
    ("churn_connects_per_s", "churn: connect+disconnect per s", "/s", "higher", None),
    ("e2e_created_p50_ms", "POST /tasks -> task.created, p50", "ms", "lower", None),
    ("e2e_created_p99_ms", "POST /tasks -> task.created, p99", "ms", "lower", None),
    ("e2e_tasks_per_s", "tasks/s through REST + worker + events", "task/s", "higher", None),
    ("fanout_server_cpu", "fan-out: server CPU (of one core)", "%", None, None),
    ("fanout_loadgen_cpu", "fan-out: load generator CPU", "%", None, None),
    ("fanout_gc_ms", "fan-out: server GC time (per second of run)", "ms/s", "lower", None),
    ("latency_gc_max_ms", "latency run: longest server GC pause", "ms", "lower", None),
    ("loadgen_cpu_max", "load generator CPU, busiest phase", "%", None, None),
    ("other_cpu_max", "other processes' CPU on the server's core, worst phase", "%", None, None),
]


def flatten(session: str, res: dict[str, dict], out: dict) -> None:
    """The figures of one session's phases, under the keys of ROWS (and a few checks)."""
    for name, r in res.items():
        out["loadgen_cpu_max"] = max(out.get("loadgen_cpu_max", 0), r.get("loadgenCpuPct", 0))
        if name in LATENCY_PHASES and PRIORITY["on"]:
            continue  # run real-time: others only get the CPU time the bench leaves idle
        other = r.get("otherOnServerCpuPct", 0)
        out["other_cpu_max"] = max(out.get("other_cpu_max", 0), other)
        # Others displaced the server only if its core was full; with the bench's priority they
        # mostly run in the time the server leaves idle.
        if other > NOISE_PCT and other + r.get("serverCpuPct", 0) >= 95:
            out.setdefault("noisy_phases", {})[name] = round(other, 1)
    if "connect-small" in res:
        c = res["connect-small"]
        out.update(connect_small_s=c["connectS"], rss_per_socket_small_kb=c["rssPerSocketKb"],
                   idle_rss_mb=c["rssBeforeKb"] / 1024, deflate_negotiated=c["deflateNegotiated"])
    if "fanout" in res:
        f = res["fanout"]
        out.update(fanout_msgs_per_s=f["msgsPerS"], fanout_server_cpu=f["serverCpuPct"],
                   fanout_msgs_per_cpu_s=f["msgsPerS"] / max(f["serverCpuPct"], 1) * 100,
                   fanout_loadgen_cpu=f["loadgenCpuPct"], fanout_lost=f["lostMsgs"],
                   fanout_bad_frames=f.get("badFrames", 0),
                   fanout_gc_ms=f["gc"]["totalMs"] / max(f["gc"]["overS"], 1e-9))
    if "latency" in res:
        lat = res["latency"]
        out.update(latency_p50_ms=lat["p50Ms"], latency_p99_ms=lat["p99Ms"],
                   latency_max_ms=lat["maxMs"], latency_lost=lat["lostMsgs"],
                   latency_gc_max_ms=lat["gc"]["maxMs"])
    if "connect-large" in res:
        c = res["connect-large"]
        out.update(connect_large_s=c["connectS"], rss_per_socket_large_kb=c["rssPerSocketKb"],
                   # both sides' CPU while connecting: which of the two set the pace
                   connect_large_server_cpu=c["serverCpuPct"],
                   connect_large_loadgen_cpu=c["loadgenCpuPct"],
                   connect_large_server_ms=c["serverCpuPct"] * c["wallS"] * 10 / c["sockets"],
                   connect_large_loadgen_ms=c["loadgenCpuPct"] * c["wallS"] * 10 / c["sockets"])
    if "churn" in res:
        c = res["churn"]
        out.update(churn_retained_kb=c["retainedKb"], churn_retained_gc_kb=c["retainedAfterGcKb"],
                   churn_retained_settled_kb=c.get("retainedSettledKb"),
                   churn_connects_per_s=c["connectsPerS"])
    if "e2e-latency" in res:
        e = res["e2e-latency"]
        out.update(e2e_created_p50_ms=e["createdP50Ms"], e2e_created_p99_ms=e["createdP99Ms"])
    if "e2e-throughput" in res:
        e = res["e2e-throughput"]
        out.update(e2e_tasks_per_s=e["tasksPerS"], e2e_timed_out=e["timedOut"])


def median(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(medians: dict[str, dict], p: dict,
          servers: list[str] | None = None) -> tuple[str, list[dict]]:
    """A Markdown table of the medians and the ratios Droid / each reference, and the same rows
    as data."""
    names = {"small": f"{p['small']:,}", "large": f"{p['large']:,}",
             "rate": p["latency"]["rate"], "cycles": p["churn"]["cycles"],
             "csockets": p["churn"]["sockets"], "settle": p["churn"]["settleS"]}
    refs = [r for r in REFERENCES if servers is None or r in servers]
    head = ["workload", "Droid"] + [TITLES[r] for r in refs] + \
        [f"Droid / {TITLES[r]}" for r in refs] + ["goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for key, label, unit, better, goal in ROWS:
        d = medians["droid"].get(key)
        values = {r: medians[r].get(key) for r in refs}
        if d is None and all(v is None for v in values.values()):
            continue
        ratios: dict[str, float | None] = {}
        verdicts = []
        for r, v in values.items():
            numbers = isinstance(d, (int, float)) and isinstance(v, (int, float))
            ratio = d / v if numbers and v > 0 else None
            ratios[r] = ratio
            if goal is not None and ratio is not None:
                met = ratio >= goal if better == "higher" else ratio <= goal
                verdicts.append("met" if met else "NOT met")
        verdict = ""
        if verdicts:
            verdict = f"{'>=' if better == 'higher' else '<='} {goal:.1f}x {' / '.join(verdicts)}"
        note = {"higher": " (higher is better)", "lower": " (lower is better)"}.get(better or "", "")
        ratio_texts = [f"{x:.2f}x" if x is not None else "-" for x in ratios.values()]
        label_text = label.format(**names)
        lines.append(f"| {label_text} ({unit}){note} | {fmt(d)} | "
                     + " | ".join(fmt(v) for v in values.values()) + " | "
                     + " | ".join(ratio_texts) + f" | {verdict} |")
        rows.append({"key": key, "label": label_text, "unit": unit, "droid": d,
                     **{r: values[r] for r in refs}, "ratio": ratios.get("reference"),
                     "ratios": ratios, "better": better, "goal": goal})
    return "\n".join(lines), rows


# ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 short run with few sockets (< 60 s)")
    ap.add_argument("--runs", type=int, help="alternating runs (default 3, quick 1)")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help="droid,reference,native (default all three: Droid, the Node "
                         "reference, the Node reference with ws's native helpers)")
    ap.add_argument("--sessions", default=",".join(SESSIONS),
                    help=f"workload groups to run (default all: {','.join(SESSIONS)})")
    ap.add_argument("--receiver", choices=("frames", "full"), default="frames",
                    help="how the load generator takes in fan-out messages: count WebSocket "
                         "frames (default) or decode each through socket.io-client")
    ap.add_argument("--profile", nargs="?", const="raw", choices=("raw", "svg"),
                    help="record Droid's fan-out and e2e throughput with py-spy into "
                         "bench/results/: collapsed stacks (raw, default) or a flame graph (svg)")
    ap.add_argument("--wait-quiet", type=float, metavar="S",
                    help="before each workload group, wait up to S seconds for other processes "
                         "to leave the CPUs idle (default 120, quick 0)")
    ap.add_argument("--no-priority", action="store_true",
                    help=f"do not raise the priority of the servers and the load generator "
                         f"(default: niceness {NICE} for them and their scheduling groups)")
    ap.add_argument("--out", type=Path, help="JSON output path (default bench/results/<time>.json)")
    args = ap.parse_args()

    p = dict(QUICK if args.quick else FULL)
    p["receiver"] = args.receiver
    runs = args.runs or p["runs"]
    wait_s = args.wait_quiet if args.wait_quiet is not None else (0 if args.quick else 120)
    servers = [s for s in args.servers.split(",") if s]
    sessions = [s for s in args.sessions.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            sys.exit(f"bench: unknown server {s!r}")
    for s in sessions:
        if s not in SESSIONS:
            sys.exit(f"bench: unknown session {s!r}")

    PRIORITY["on"] = not args.no_priority
    check_tools()
    ensure_node_packages()
    if "native" in servers:
        ensure_node_packages(NATIVE)
    raise_fd_limit()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "logs" / stamp
    logs.mkdir(parents=True, exist_ok=True)
    profiler = (Profiler(RESULTS, p["fanout"]["durationS"] + p["fanout"]["warmupS"], args.profile)
                if args.profile else None)
    started = time.monotonic()
    raw: dict[str, list[dict]] = {s: [] for s in SERVERS}
    failures: list[str] = []
    for run in range(1, runs + 1):
        order = servers if run % 2 == 1 else list(reversed(servers))
        for kind in order:
            figures: dict[str, Any] = {}
            phases_raw: dict[str, Any] = {}
            for session in sessions:
                if session == "e2e" and kind != "droid":
                    continue  # the reference has no REST API nor worker
                tag = f"run{run}-{kind}-{session}"
                if wait_s > 0:
                    wait_quiet(wait_s)
                log(f"run {run}/{runs}: {kind}, {session}")
                server = Server(kind, logs / f"{tag}.server.log")
                try:
                    hook = profiler.hook(server, f"{stamp}-{tag}") if profiler else None
                    res = run_loadgen(server, session_phases(session, p), logs / f"{tag}.loadgen.log",
                                      p["session_timeout_s"], hook)
                    flatten(session, res, figures)
                    phases_raw[session] = res
                except Exception as exc:  # keep going: one failure should not lose the rest
                    failures.append(f"{tag}: {exc}")
                    log(f"FAILED {tag}: {exc}")
                finally:
                    server.stop()
            raw[kind].append({"run": run, "figures": figures, "phases": phases_raw})
    if profiler:
        profiler.wait()

    medians = {kind: {key: median([r["figures"].get(key) for r in raw[kind]])
                      for key, *_ in ROWS} for kind in SERVERS}
    text, rows = table(medians, p, servers)
    elapsed = time.monotonic() - started
    info = machine()
    header = (f"{dt.datetime.now():%Y-%m-%d %H:%M} - droid {info['droidCommit']}"
              f"{' + uncommitted changes' if info['droidUncommittedChanges'] else ''} "
              f"(source {info['droidSourceSha256']}); {info['cpus']} x {info['cpu']}, "
              f"{info['python']}, node {info['node']}, socket.io {info['socketio']}"
              f"{' (native reference: + ' + info['native'] + ')' if 'native' in servers else ''}; "
              f"{'quick' if args.quick else 'full'} mode, {runs} run(s), medians; "
              f"fan-out receiver: {args.receiver}; {elapsed:.0f} s")
    print(header)
    print(text)
    warnings = []
    for kind in SERVERS:
        for r in raw[kind]:
            f = r["figures"]
            if f.get("fanout_lost") or f.get("latency_lost"):
                warnings.append(f"{kind} run {r['run']}: lost messages (fan-out {f.get('fanout_lost')}, "
                                f"latency {f.get('latency_lost')})")
            if f.get("fanout_bad_frames"):
                warnings.append(f"{kind} run {r['run']}: {f['fanout_bad_frames']} malformed frames")
            if f.get("deflate_negotiated"):
                warnings.append(f"{kind} run {r['run']}: per-message deflate negotiated on "
                                f"{f['deflate_negotiated']} sockets")
            if f.get("e2e_timed_out"):
                warnings.append(f"{kind} run {r['run']}: e2e throughput timed out")
            noisy = f.get("noisy_phases", {})
            if noisy:
                warnings.append(f"{kind} run {r['run']}: other processes shared the server's full core during "
                                + ", ".join(f"{k} ({v:.0f}%)" for k, v in noisy.items())
                                + ": those figures are noisy")
            if f.get("fanout_loadgen_cpu", 0) > 85:
                warnings.append(f"{kind} run {r['run']}: load generator at "
                                f"{f['fanout_loadgen_cpu']:.0f}% during fan-out: it may be the limit")
    for w in warnings + failures:
        print(f"WARNING: {w}")
    out = args.out or RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": info,
        "command": " ".join([Path(sys.executable).name] + sys.argv), "mode": "quick" if args.quick else "full",
        "runs": runs, "params": p, "header": header, "table": rows, "medians": medians,
        "raw": raw, "warnings": warnings, "failures": failures, "logs": str(logs),
    }, indent=1))
    log(f"wrote {out}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
