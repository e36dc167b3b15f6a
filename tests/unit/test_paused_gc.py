"""model.loading.paused_gc: the collector is off while a model loads, and nothing it should find is lost."""

from __future__ import annotations

import gc
import weakref

from model.loading import paused_gc


class Node:
    pass


def test_objects_made_while_loading_go_to_the_oldest_generation_and_garbage_is_still_found():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        kept = [Node() for _ in range(5000)]  # a model's modules: live as long as the process
        cycle = Node()
        cycle.me = cycle  # garbage only the cyclic collector can free
        probe = weakref.ref(cycle)
        del cycle
        assert gc.get_count()[0] > 5000  # without the pause, gen-0 passes would have run over them
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert gc.get_count()[0] < 100  # promoted: the first reply does not pay a pass over them
    assert probe() is not None
    gc.collect()
    assert probe() is None and len(kept) == 5000


def test_leaves_a_disabled_collector_and_frozen_objects_as_they_were():
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with paused_gc():
            Node()
        # others' frozen objects stay frozen (gc.unfreeze would empty the permanent generation); a few may be
        # freed meanwhile by other threads left from earlier tests
        assert gc.get_freeze_count() > frozen - 1000 and gc.isenabled()
    finally:
        gc.unfreeze()
