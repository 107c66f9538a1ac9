"""droid/collector.py: the cycle collector in small steps (each walks only what is new), with
everything thawed and collected once in a while. The steps are taken by hand here (the timer
that takes them in a server is set far away), so that no test depends on timing."""
from __future__ import annotations

import gc
import subprocess
import sys
import time
import weakref

import pytest
import pytest_asyncio

from droid.collector import THRESHOLDS, Collector
from droid_process import ROOT

pytestmark = pytest.mark.asyncio


class Node:
    def __init__(self) -> None:
        self.other: "Node | None" = None


def pair() -> tuple[Node, Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, b


@pytest_asyncio.fixture
async def collector():
    before = gc.get_threshold()
    collector = Collector(step_s=3600, thaw_s=3600)
    collector.start()
    try:
        yield collector
    finally:
        collector.stop()
        gc.unfreeze()
        gc.set_threshold(*before)


def tracked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


async def test_a_step_collects_new_garbage_cycles_and_freezes_what_lives(collector):
    assert gc.get_threshold() == THRESHOLDS
    kept, _ = pair()
    garbage = weakref.ref(pair()[0])
    assert tracked(kept)
    collector._step()
    assert garbage() is None, "a new garbage cycle outlived a step"
    assert not tracked(kept), "a survivor of a step was not frozen"
    assert collector.longest_ms > 0


async def test_frozen_cycles_wait_for_the_thaw(collector):
    a, _ = pair()
    collector._step()  # a and b are alive: frozen
    ref = weakref.ref(a)
    del a, _
    collector._step()
    assert ref() is not None, "a step walked frozen objects"
    collector._thawed_at = time.monotonic() - collector.thaw_s  # an hour has passed
    collector._step()
    assert ref() is None, "the thaw did not collect a cycle of frozen objects"


# A child process makes a fragmented heap (keeps one block in three of ~170 MB), then runs the
# collector for a second: with trim_s short, malloc_trim gives the free pages back.
TRIM_CHILD = r"""
import asyncio, random, sys
from droid.collector import Collector

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

async def main(trim_s):
    random.seed(1)
    blocks = [bytearray(random.randint(200, 5000)) for _ in range(60_000)]
    del blocks[1::3], blocks[1::2]  # two blocks in three freed, between the kept ones
    before = rss_mb()
    collector = Collector(step_s=0.05, thaw_s=3600, trim_s=trim_s)
    collector.start()
    await asyncio.sleep(1.0)
    collector.stop()
    print(before, rss_mb(), collector.trims)

asyncio.run(main(float(sys.argv[1])))
"""


@pytest.mark.parametrize("trim_s, trimmed", [(0.1, True), (3600, False)])
async def test_memory_a_burst_freed_goes_back_to_the_system(trim_s, trimmed):
    done = subprocess.run([sys.executable, "-c", TRIM_CHILD, str(trim_s)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    before, after, trims = done.stdout.split()
    before, after = float(before), float(after)
    if trimmed:
        assert int(trims) >= 1
        assert before - after > 20, (before, after)  # 32 MB of free pages returned here
    else:
        assert int(trims) == 0
        assert before - after < 5, (before, after)  # glibc keeps them without the trim
