"""droid/collector.py: the cycle collector in small steps (each walks only what is new), with
everything thawed and collected once in a while."""
from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from droid.collector import THRESHOLDS, Collector

pytestmark = pytest.mark.asyncio


class Node:
    def __init__(self) -> None:
        self.other: "Node | None" = None


def cycle() -> weakref.ref:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


async def test_steps_collect_new_cycles_and_freeze_survivors():
    before = gc.get_threshold()
    collector = Collector(step_s=0.05, thaw_s=3600)
    try:
        collector.start()
        assert gc.get_threshold() == THRESHOLDS
        kept = Node()
        garbage = cycle()
        frozen = gc.get_freeze_count()
        await asyncio.sleep(0.2)
        assert garbage() is None, "a new garbage cycle outlived a step"
        assert gc.get_freeze_count() >= frozen  # survivors (kept) are frozen
        assert not gc.is_tracked(kept) or kept not in gc.get_objects()
    finally:
        collector.stop()
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_a_cycle_made_of_frozen_objects_is_collected_at_the_thaw():
    before = gc.get_threshold()
    collector = Collector(step_s=0.05, thaw_s=0.3)
    try:
        collector.start()
        a, b = Node(), Node()
        a.other, b.other = b, a
        await asyncio.sleep(0.1)  # a step froze them while alive
        assert a not in gc.get_objects()
        ref = weakref.ref(a)
        del a, b  # now garbage, but frozen: only the thaw can collect it
        await asyncio.sleep(0.1)
        assert ref() is not None
        await asyncio.sleep(0.5)
        assert ref() is None, "the thaw did not collect a cycle of frozen objects"
    finally:
        collector.stop()
        gc.unfreeze()
        gc.set_threshold(*before)
