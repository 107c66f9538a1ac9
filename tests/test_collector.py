"""droid/collector.py: the cycle collector in small steps (each walks only what is new), with
everything thawed and collected once in a while. The steps are taken by hand here (the timer
that takes them in a server is set far away), so that no test depends on timing."""
from __future__ import annotations

import gc
import time
import weakref

import pytest
import pytest_asyncio

from droid.collector import THRESHOLDS, Collector

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
