"""The load of bench/scale.py: the scale_client.js processes that hold one population of
sockets, pinned to the load's core, and the commands they are sent (connect, churn, record,
report, stop) over their stdin, one JSON object a line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from harness import BENCH, LOADGEN_CPU, SECRET, cpu_pin, favoured, process_cpu_s, read_line

STEADY = 100  # sockets whose event latency is measured (50 users), held by the probe
PER_PROCESS = 5000  # sockets per load process


class Clients:
    """The load processes of one population: the probe (steady sockets 0..STEADY-1) and the
    swarms (the others, PER_PROCESS at most each), pinned to the load's core."""

    def __init__(self, port: int, sockets: int, logs: Path, tag: str) -> None:
        steady = min(STEADY, sockets)
        shares = [(0, steady, True)]
        for first in range(steady, sockets, PER_PROCESS):
            shares.append((first, min(PER_PROCESS, sockets - first), False))
        self.procs: list[subprocess.Popen] = []
        self.shares = shares
        self._next_id = 0
        for first, count, probe in shares:
            cfg = {"port": port, "secret": SECRET, "first": first, "count": count, "probe": probe}
            err = open(logs / f"{tag}.client{first}.log", "wb")
            proc = subprocess.Popen(cpu_pin(LOADGEN_CPU) + ["node", str(BENCH / "scale_client.js"),
                                                            json.dumps(cfg)],
                                    cwd=BENCH, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, bufsize=0, start_new_session=True,
                                    preexec_fn=favoured)
            err.close()
            self.procs.append(proc)
        for proc in self.procs:
            line = read_line(proc, 60)
            if not line or not json.loads(line).get("ready"):
                self.kill()
                raise RuntimeError(f"a load process did not start: {line!r}")

    @property
    def probe(self) -> subprocess.Popen:
        return self.procs[0]

    @property
    def swarms(self) -> list[subprocess.Popen]:
        return self.procs[1:]

    def send(self, proc: subprocess.Popen, cmd: str, **args: Any) -> int:
        self._next_id += 1
        assert proc.stdin is not None
        proc.stdin.write((json.dumps({"id": self._next_id, "cmd": cmd, **args}) + "\n").encode())
        proc.stdin.flush()
        return self._next_id

    def reply(self, proc: subprocess.Popen, timeout: float) -> dict:
        line = read_line(proc, timeout)
        if line is None:
            raise RuntimeError(f"a load process did not answer within {timeout:.0f} s "
                               f"(exit code {proc.poll()})")
        msg = json.loads(line)
        if not msg.get("ok"):
            raise RuntimeError(f"load process failed: {msg.get('error')}")
        return msg

    def all(self, procs: list[subprocess.Popen], cmd: str, timeout: float,
            args_of: Any = None) -> list[dict]:
        """Send `cmd` to each process at once (args_of(share) -> its arguments), then wait for
        every answer."""
        for proc in procs:
            share = self.shares[self.procs.index(proc)]
            self.send(proc, cmd, **(args_of(share) if args_of else {}))
        return [self.reply(proc, timeout) for proc in procs]

    def cpu_s(self) -> float:
        return sum(process_cpu_s(p.pid) for p in self.procs if p.poll() is None)

    def kill(self) -> None:
        """SIGKILL every load process at once: the kernel drops all their sockets."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()
