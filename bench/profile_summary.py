#!/usr/bin/env python3
"""Summarise a py-spy profile in collapsed-stack form (`py-spy record --format raw`).

    python bench/profile_summary.py bench/results/<...>-fanout.txt [--top 25] [--us-per-sample X]

Prints where the samples go: the functions that were running (self), the functions that were on
the stack (inclusive), and the stages of one room emit in python-socketio / python-engineio /
Tornado. With --us-per-msg (server CPU microseconds per delivered message, from the bench
result: serverCpuPct / 100 / msgsPerS * 1e6) each line also shows microseconds per message.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

# Stages of Droid's delivery path, matched against the innermost frame that names one of them
# (first match from the leaf up). Order matters: more specific first.
STAGES = [
    ("socket send syscall (IOStream.write_to_fd)", r"write_to_fd"),
    ("Tornado framing + IOStream.write (Future per write)", r"_write_frame|IOStream.write |BaseIOStream.write |_handle_write"),
    ("Tornado write_message: task per message (ensure_future)", r"WebSocketProtocol13.write_message"),
    ("engineio writer: wake-up, poll(), wait_for timer", r"AsyncSocket.poll|writer \(engineio"),
    ("engineio AsyncSocket.send: ping check + queue.put", r"AsyncSocket.send|check_ping_timeout"),
    ("socketio: task per recipient (_send_eio_packet)", r"_send_eio_packet|AsyncServer.send_packet"),
    ("socketio AsyncManager.emit: encode once, create tasks, wait", r"AsyncManager.emit"),
    ("Droid Delivery.deliver (outboxes, frames)", r"Delivery\.deliver|Outbox\.write|SessionQueue\.send_frames"),
    ("Droid EventsService.publish / bench trigger", r"EventsService\.(publish|_fan_out|receive)|EmitHandler"),
    ("reading client frames (Tornado receive loop)", r"_receive_frame|_read_to_buffer|read_from_fd"),
    ("HTTP request handling (Tornado)", r"HTTP1Connection|HTTP1ServerConnection|_execute "),
    ("asyncio task/handle machinery", r"Task\.|Handle._run|_step|__step|call_soon|create_task|ensure_future|_wakeup"),
    ("event loop: select/epoll (idle or waiting)", r"select \(selectors|EpollSelector"),
]


def parse(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    """`Class.method (pkg/module.py:123)` -> `Class.method (pkg/module.py)`."""
    return re.sub(r":\d+\)$", ")", frame)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--us-per-msg", type=float, help="server CPU microseconds per delivered message")
    args = ap.parse_args()
    stacks = parse(args.profile)
    total = sum(c for _, c in stacks)
    if not total:
        sys.exit("no samples")
    self_time: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    stages: collections.Counter = collections.Counter()
    for frames, count in stacks:
        self_time[short(frames[-1])] += count
        for name in {short(f) for f in frames}:
            incl[name] += count
        stage = "other"
        for frame in reversed(frames):
            hit = next((label for label, pattern in STAGES if re.search(pattern, frame)), None)
            if hit:
                stage = hit
                break
        stages[stage] += count

    def show(title: str, counter: collections.Counter, n: int) -> None:
        print(f"\n{title}")
        for name, count in counter.most_common(n):
            share = count / total
            extra = f"  {share * args.us_per_msg:6.2f} us/msg" if args.us_per_msg else ""
            print(f"  {100 * share:5.1f}%{extra}  {name}")

    print(f"{total} samples from {args.profile}")
    show("stages of the delivery path (innermost match):", stages, len(STAGES) + 1)
    show(f"self time, top {args.top}:", self_time, args.top)
    show(f"inclusive time, top {args.top}:", incl, args.top)


if __name__ == "__main__":
    main()
