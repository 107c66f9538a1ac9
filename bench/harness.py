"""What every bench script shares: the servers under test as processes pinned to a core, the
load's priority, /proc readings, the description of the machine, and the figures' formatting.

bench/run.py (the side-by-side workloads) and bench/scale.py (the same figures against the
number of sockets) start Droid (bench/droid_server.py) and the two Node references
(bench/reference/server.js, with bench/reference-native/'s packages for the native one) through
`Server`, pin them with `cpu_pin`, and raise their priority with `favoured` / `realtime`. Only
the standard library is used.
"""
from __future__ import annotations

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


def raise_fd_limit(sockets: int = 5000) -> int:
    """Raise this process's open-file limit (inherited by every process it starts) to the hard
    limit; returns it. The server holds one descriptor per socket, plus its own."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < sockets + 2000:
        log(f"WARNING: open-file limit {want} may be too low for {sockets:,} sockets")
    return want


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
        # the last commit that changed droid/ (HEAD may add only bench or docs commits)
        "droidCodeCommit": code_commit(commit),
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


def code_commit(commit: str) -> str:
    """The last commit at or before `commit` that changed droid/."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", commit, "--",
                               "droid"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


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
                       DROID_ANON_SESSIONS_PER_ADDRESS="1000000", DROID_ANON_SESSIONS="1000000",
                       # and the quotas of issue 22 out of the way of the bench's publishers
                       DROID_QUOTA_TASKS_PER_MINUTE="100000000",
                       DROID_QUOTA_PENDING_TASKS="100000000")
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


# ------------------------------------------------------------------------------------------
# /proc


CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (its exited threads included), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    """Resident memory of a process, as /proc/<pid>/status reports it (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def core_busy_s(cpu: str) -> float:
    """Busy CPU seconds of one core since boot (/proc/stat), to tell what others ran there."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) for x in line.split()[1:9]]
            return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK
    return 0.0
