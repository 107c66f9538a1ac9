#!/usr/bin/env python3
"""Cost per socket against the number of sockets: Droid and both Node references, one command.

    .venv/bin/python bench/scale.py            # 2,000 / 5,000 / 10,000 / 15,000 sockets
    .venv/bin/python bench/scale.py --quick    # 500 / 1,000 sockets, short phases (< 2 minutes)

For each size and server (a fresh server process each time, pinned to CPU 0; the load on CPU 1),
with idle sockets two per user, opened by bench/scale_client.js processes (rawclient.js's raw
client, at most 5,000 sockets per process: the open-file hard limit is per process):

1. connect: every socket, 100 handshakes at a time, until each has received `connected`:
   connect time, server CPU per connect, memory per idle socket (server RSS after - before, / N).
2. churn: events at 200/s to the users of 100 steady sockets (held by a probe process, real-time
   priority) while 10% of the others a second disconnect and reconnect (or as many as the
   server and the load sustain: the achieved rate is reported): p50 / p99 / max of receive time
   - data.sentAt of every event on the steady sockets.
3. drop: every load process killed (SIGKILL) at once: the server's CPU time from /proc until it is
   idle again and counts no socket.
4. SIGTERM: N sockets connected again, then SIGTERM: seconds until the server process exits.

Prints a Markdown table (median over --runs of each figure, ratios Droid / each reference, the
issue-21 goals), writes the JSON to bench/results/<time>-scale.json and one PNG per figure
(matplotlib, `pip install -e .[bench]`) to bench/results/<time>-scale/. bench/README.md explains
each figure.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness import (LOADGEN_CPU, NATIVE, NOISE_PCT, PRIORITY, RESULTS, SERVER_CPU, SERVERS,
                     Server, check_tools, code_commit, core_busy_s, ensure_node_packages, log,
                     machine, median, process_cpu_s, raise_fd_limit, realtime, rss_kb,
                     wait_quiet)
import scale_report
from scale_clients import STEADY, Clients

FULL = {"sizes": [2000, 5000, 10000, 15000], "concurrency": 100, "churnFraction": 0.10,
        "churnMaxInFlight": 100, "eventRate": 200, "latencyS": 10.0, "warmS": 2.0,
        "dropTimeoutS": 600, "sigtermTimeoutS": 300, "connectTimeoutS": 600}
QUICK = dict(FULL, sizes=[500, 1000], latencyS=3.0, warmS=1.0, dropTimeoutS=120,
             sigtermTimeoutS=60, connectTimeoutS=120)


def get_json(url: str, timeout: float = 120) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def post_json(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class Meter:
    """Server CPU, its core's other users and the load's CPU between start and stop."""

    def __init__(self, server: Server, clients: Clients | None = None) -> None:
        self.server, self.clients = server, clients
        self.t0 = time.monotonic()
        self.cpu0 = process_cpu_s(server.pid)
        self.core0 = core_busy_s(SERVER_CPU)
        self.load0 = clients.cpu_s() if clients else 0.0

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        cpu = process_cpu_s(self.server.pid) - self.cpu0
        other = max(0.0, core_busy_s(SERVER_CPU) - self.core0 - cpu)
        out = {"wallS": wall, "serverCpuS": cpu, "serverCpuPct": 100 * cpu / wall,
               "otherOnServerCpuPct": 100 * other / wall}
        if self.clients:
            out["loadCpuPct"] = 100 * (self.clients.cpu_s() - self.load0) / wall
        return out


def wait_sockets(server: Server, n: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = get_json(server.url + "/bench/stats", timeout=max(1.0, timeout))
        if s["sockets"] == n and s["engineSockets"] == n:
            return s
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server counts {s['sockets']} sockets "
                               f"({s['engineSockets']} Engine.IO), not {n}")
        time.sleep(0.05)


def wait_idle(pid: int, timeout: float, window_s: float = 0.5, max_pct: float = 5.0) -> float:
    """Wait until a process used at most max_pct of a core over the last window_s; returns the
    time it took."""
    t0 = time.monotonic()
    samples = [(t0, process_cpu_s(pid))]
    while True:
        time.sleep(0.05)
        now, cpu = time.monotonic(), process_cpu_s(pid)
        samples.append((now, cpu))
        while len(samples) > 2 and now - samples[1][0] >= window_s:
            samples.pop(0)
        t_old, cpu_old = samples[0]
        if now - t_old >= window_s and 100 * (cpu - cpu_old) / (now - t_old) <= max_pct:
            return now - t0
        if now - t0 > timeout:
            raise RuntimeError(f"process {pid} still busy after {timeout:.0f} s")


def connect(server: Server, clients: Clients, n: int, p: dict) -> dict:
    """Phase 1: open all n sockets; connect time, server CPU per connect, RSS per socket."""
    wait_sockets(server, 0, 30)
    rss0 = rss_kb(server.pid)
    meter = Meter(server, clients)
    conc = p["concurrency"]
    replies = clients.all(clients.procs, "connect", p["connectTimeoutS"],
                          lambda share: {"concurrency": max(1, round(conc * share[1] / n))})
    usage = meter.stop()
    wait_sockets(server, n, 120)
    rss1 = rss_kb(server.pid)
    connect_s = (max(r["t1"] for r in replies) - min(r["t0"] for r in replies)) / 1000
    return {"sockets": n, "connectS": connect_s, "rssBeforeKb": rss0, "rssAfterKb": rss1,
            "rssPerSocketKb": (rss1 - rss0) / n, "cpuMsPerConnect": usage["serverCpuS"] * 1000 / n,
            **usage}


def churn_latency(server: Server, clients: Clients, n: int, p: dict) -> dict:
    """Phase 2: events to the steady sockets while the others churn."""
    wait_idle(server.pid, 60)
    others = n - STEADY
    # 10% of the others a second, or the same rate for every server and size (--churn-per-s)
    target = p.get("churnPerS") or p["churnFraction"] * others
    longest = p["warmS"] + p["latencyS"] + 600  # churn stops when the events are out, at most
    events = int(p["eventRate"] * p["latencyS"])
    steady_users = STEADY // 2
    expected = events * 2 * 2  # the event and task.event, to each of the user's two sockets
    clients.all([clients.probe], "record", 10)
    in_flight = p["churnMaxInFlight"]
    for proc in clients.swarms:
        share = clients.shares[clients.procs.index(proc)]
        clients.send(proc, "churn", ratePerS=target * share[1] / others, durationS=longest,
                     maxInFlight=max(1, round(in_flight * share[1] / others)))
    realtime([clients.probe.pid], True)
    emitted: dict = {}

    def emit() -> None:
        try:
            emitted.update(post_json(server.url + "/bench/emit",
                                     {"count": events, "users": steady_users, "start": 0,
                                      "rate": p["eventRate"], "stamp": "due"},
                                     timeout=p["latencyS"] + 600))
        except Exception as exc:  # reported below
            emitted["error"] = str(exc)

    try:
        time.sleep(p["warmS"])
        get_json(server.url + "/bench/stats?reset=1")  # garbage collections from here on
        meter = Meter(server, clients)
        w0 = time.monotonic() * 1000
        thread = threading.Thread(target=emit)
        thread.start()
        thread.join()
        w1 = time.monotonic() * 1000
        usage = meter.stop()
        stats = get_json(server.url + "/bench/stats")
        gc_stats = stats.get("gc") or {}
        for proc in clients.swarms:
            clients.send(proc, "stop")
        if "error" in emitted:
            raise RuntimeError(f"POST /bench/emit failed: {emitted['error']}")
        clients.send(clients.probe, "report", expected=expected, drainS=10)
        lat = clients.reply(clients.probe, 60)
    finally:
        realtime([clients.probe.pid], False)
    churned = [clients.reply(proc, 300) for proc in clients.swarms]
    in_window = sum(1 for r in churned for t in r["doneAt"] if w0 <= t <= w1)
    wait_sockets(server, n, 120)
    return {
        "steadySockets": STEADY, "eventRate": p["eventRate"], "events": events,
        "churnTargetPerS": target, "churnPerS": in_window / ((w1 - w0) / 1000),
        "churnStarted": sum(r["started"] for r in churned),
        "churnCompleted": sum(r["completed"] for r in churned),
        "churnFailed": sum(r["failed"] for r in churned),
        **{k: lat[k] for k in ("samples", "lost", "p50Ms", "p90Ms", "p99Ms", "p999Ms", "maxMs")},
        # from the moment the server emitted each event: what the loop's lag hides
        **{f"{k[:-2]}FromPublishMs": v for k, v in lat["fromPublish"].items() if k != "n"},
        "emitterMaxLagMs": emitted.get("maxLagMs"), "emitS": (w1 - w0) / 1000, **usage,
        "gcCount": gc_stats.get("count"), "gcTotalMs": gc_stats.get("totalMs"),
        "gcMaxMs": gc_stats.get("maxMs"),
        **({"slowCallbacks": stats["slowCallbacks"]} if "slowCallbacks" in stats else {}),
    }


def drop(server: Server, clients: Clients, n: int, p: dict) -> dict:
    """Phase 3: every client gone at once (SIGKILL of the load processes); the server's CPU until
    it is idle and counts no socket."""
    wait_idle(server.pid, 60)
    meter = Meter(server)
    t0 = time.monotonic()
    clients.kill()
    killed_s = time.monotonic() - t0
    gone_s = None
    asked = 0.0
    samples = [(time.monotonic(), process_cpu_s(server.pid))]
    while True:
        time.sleep(0.05)
        now, cpu = time.monotonic(), process_cpu_s(server.pid)
        samples.append((now, cpu))
        while len(samples) > 2 and now - samples[1][0] >= 0.5:
            samples.pop(0)
        t_old, cpu_old = samples[0]
        quiet = now - t_old >= 0.5 and (cpu - cpu_old) / (now - t_old) <= 0.05
        # the count is asked for at most twice a second while the server works (each question
        # costs it a little), and whenever it is quiet
        if gone_s is None and (quiet or now - asked >= 0.5):
            asked = now
            s = get_json(server.url + "/bench/stats", timeout=p["dropTimeoutS"])
            if s["sockets"] == 0 and s["engineSockets"] == 0:
                gone_s = time.monotonic() - t0
        if quiet and gone_s is not None:
            break
        if now - t0 > p["dropTimeoutS"]:
            raise RuntimeError(f"the server still counts sockets or works {p['dropTimeoutS']} s "
                               "after the drop")
    usage = meter.stop()
    return {"sockets": n, "cpuS": usage["serverCpuS"], "cpuMsPerSocket": usage["serverCpuS"] * 1000 / n,
            "goneS": gone_s, "killS": killed_s, **usage}


def sigterm(server: Server, n: int, p: dict, logs: Path, tag: str) -> dict:
    """Phase 4: n sockets connected again, then SIGTERM: seconds until the process exits."""
    clients = Clients(server.port, n, logs, tag + "-sigterm")
    try:
        clients.all(clients.procs, "connect", p["connectTimeoutS"],
                    lambda share: {"concurrency": max(1, round(p["concurrency"] * share[1] / n))})
        wait_sockets(server, n, 120)
        wait_idle(server.pid, 60)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(p["sigtermTimeoutS"])
            exit_s = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
            code, exit_s = None, None
        return {"sockets": n, "exitS": exit_s, "exitCode": code,
                "timedOut": exit_s is None, "timeoutS": p["sigtermTimeoutS"]}
    finally:
        clients.kill()


def measure(kind: str, n: int, p: dict, logs: Path, tag: str) -> dict:
    """Every phase of one size on one fresh server."""
    server = Server(kind, logs / f"{tag}.server.log")
    phases: dict[str, Any] = {}
    try:
        clients = Clients(server.port, n, logs, tag)
        try:
            phases["connect"] = connect(server, clients, n, p)
            log(f"  connect {n:,}: {phases['connect']['connectS']:.2f} s, "
                f"{phases['connect']['rssPerSocketKb']:.1f} KB/socket")
            phases["churn"] = churn_latency(server, clients, n, p)
            log(f"  churn {phases['churn']['churnPerS']:.0f}/s: p99 "
                f"{phases['churn']['p99Ms']:.2f} ms")
            phases["drop"] = drop(server, clients, n, p)
            log(f"  drop: {phases['drop']['cpuS']:.2f} s of CPU")
        finally:
            clients.kill()
        phases["sigterm"] = sigterm(server, n, p, logs, tag)
        exit_s = phases["sigterm"]["exitS"]
        log(f"  SIGTERM to exit: {exit_s:.2f} s" if exit_s is not None else "  SIGTERM: timed out")
    finally:
        server.stop()
    return phases


def replot(path: Path, folder: Path | None) -> None:
    saved = json.loads(path.read_text())
    sizes = saved["params"]["sizes"]
    servers = [s for s in SERVERS if any(saved["raw"][s][str(n)] for n in sizes)]
    text, _ = scale_report.table(saved["figures"], sizes, servers)
    print(saved["header"])
    print(text)
    for w in saved["warnings"]:
        print(f"WARNING: {w}")
    info = saved["machine"]
    info.setdefault("droidCodeCommit", code_commit(info["droidCommit"]))
    caption = (f"{saved['date'][:10]} droid {info['droidCodeCommit']}"
               f"{'+' if info['droidUncommittedChanges'] else ''}, bench/scale.py"
               f"{' --quick' if saved['command'].count('--quick') else ''}")
    made = scale_report.plots(saved["figures"], sizes, servers, folder or path.with_suffix(""),
                              caption)
    log(f"{len(made)} plots in {folder or path.with_suffix('')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="500 and 1,000 sockets, short phases")
    ap.add_argument("--sizes", help="comma-separated socket counts (default 2000,5000,10000,15000; "
                                    "quick 500,1000)")
    ap.add_argument("--churn-per-s", type=float, metavar="N",
                    help="churn N sockets a second at every size, for every server (default: "
                         "10%% of the idle ones, or as many as the load generator manages)")
    ap.add_argument("--servers", default=",".join(SERVERS), help="droid,reference,native")
    ap.add_argument("--runs", type=int, default=1, help="alternating runs (medians; default 1)")
    ap.add_argument("--wait-quiet", type=float, metavar="S",
                    help="before each server, wait up to S s for the CPUs to be idle "
                         "(default 30, quick 0)")
    ap.add_argument("--no-priority", action="store_true",
                    help="do not raise the bench processes' priority")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/<time>-scale.json)")
    ap.add_argument("--plots", type=Path, help="folder of the PNGs (default: beside the JSON)")
    ap.add_argument("--replot", type=Path, metavar="JSON",
                    help="measure nothing: print the table and draw the plots of a JSON written "
                         "by an earlier run (into --plots, default beside that JSON)")
    args = ap.parse_args()
    if args.replot:
        replot(args.replot, args.plots)
        return

    p = dict(QUICK if args.quick else FULL)
    if args.sizes:
        p["sizes"] = [int(s.replace("_", "")) for s in args.sizes.split(",") if s]
    if args.churn_per_s:
        p["churnPerS"] = args.churn_per_s
    if any(n < STEADY + 2 for n in p["sizes"]):
        sys.exit(f"bench: every size must be at least {STEADY + 2} sockets")
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            sys.exit(f"bench: unknown server {s!r}")
    wait_s = args.wait_quiet if args.wait_quiet is not None else (0 if args.quick else 30)
    PRIORITY["on"] = not args.no_priority
    check_tools()
    ensure_node_packages()
    if "native" in servers:
        ensure_node_packages(NATIVE)
    limit = raise_fd_limit(max(p["sizes"]))
    if max(p["sizes"]) + 1000 > limit:
        sys.exit(f"bench: the open-file limit ({limit}) is too low for {max(p['sizes']):,} sockets")
    try:
        os.sched_setaffinity(0, {int(LOADGEN_CPU)})  # this orchestrator is part of the load
    except OSError:
        pass
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "logs" / f"{stamp}-scale"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    uptime0 = Path("/proc/loadavg").read_text().split()[:3]
    raw: dict[str, dict[str, list]] = {s: {str(n): [] for n in p["sizes"]} for s in SERVERS}
    failures: list[str] = []
    for run in range(1, args.runs + 1):
        for n in p["sizes"]:
            order = servers if run % 2 == 1 else list(reversed(servers))
            for kind in order:
                tag = f"run{run}-{n}-{kind}"
                if wait_s > 0:
                    wait_quiet(wait_s)
                log(f"run {run}/{args.runs}: {kind}, {n:,} sockets")
                try:
                    raw[kind][str(n)].append(measure(kind, n, p, logs, tag))
                except Exception as exc:  # keep going: one failure should not lose the rest
                    failures.append(f"{tag}: {exc}")
                    log(f"FAILED {tag}: {exc}")
                # what is measured so far survives an interrupted run
                (logs / "partial.json").write_text(json.dumps({"params": p, "raw": raw,
                                                                "failures": failures}, indent=1))
    elapsed = time.monotonic() - started
    uptime1 = Path("/proc/loadavg").read_text().split()[:3]
    figures = {kind: {str(n): {key: median([scale_report.figure(key, r) for r in raw[kind][str(n)]])
                               for key in scale_report.KEYS}
                      for n in p["sizes"]} for kind in SERVERS}
    info = machine()
    header = (f"{dt.datetime.now():%Y-%m-%d %H:%M} - droid {info['droidCodeCommit']} "
              f"(HEAD {info['droidCommit']})"
              f"{' + uncommitted changes' if info['droidUncommittedChanges'] else ''} "
              f"(source {info['droidSourceSha256']}); {info['cpus']} x {info['cpu']}, "
              f"{info['python']}, node {info['node']}, socket.io {info['socketio']}; "
              f"{'quick' if args.quick else 'full'} mode, {args.runs} run(s); {elapsed:.0f} s; "
              f"load average {' '.join(uptime0)} before, {' '.join(uptime1)} after")
    text, rows = scale_report.table(figures, p["sizes"], servers)
    warnings = scale_report.warnings(raw, NOISE_PCT) + failures
    print(header)
    print(text)
    for w in warnings:
        print(f"WARNING: {w}")
    out = args.out or RESULTS / f"{stamp}-scale{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = args.plots or out.with_suffix("")
    caption = (f"{dt.datetime.now():%Y-%m-%d} droid {info['droidCodeCommit']}"
               f"{'+' if info['droidUncommittedChanges'] else ''}, bench/scale.py"
               f"{' --quick' if args.quick else ''}, {args.runs} run(s)")
    made = scale_report.plots(figures, p["sizes"], servers, plots, caption)
    out.write_text(json.dumps({
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": info,
        "command": " ".join([Path(sys.executable).name] + sys.argv), "params": p,
        "loadAverageBefore": uptime0, "loadAverageAfter": uptime1, "header": header,
        "table": rows, "figures": figures, "raw": raw, "warnings": warnings, "plots": made,
        "logs": str(logs),
    }, indent=1))
    log(f"wrote {out}" + (f" and {len(made)} plots in {plots}" if made else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
