"""The engine's encode-ahead stream: order, bounded look-ahead, errors and early stops."""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest

from evalkit.evaluation.engine import one_ahead


class Block:
    def __init__(self, i: int) -> None:
        self.i = i
        self.data = np.full(4, i)


def test_items_come_in_order_made_by_another_thread():
    makers = set()

    def source():
        for i in range(50):
            makers.add(threading.current_thread().name)
            yield Block(i)

    assert [b.i for b in one_ahead(source())] == list(range(50))
    assert makers == {"evalkit-encode-ahead"}


def test_at_most_the_callers_item_and_the_next_are_alive():
    """Guards the memory bound: the thread may make item j+1 while the caller holds item j,
    never j+2 (three blocks of vectors alive)."""
    alive: list[weakref.ref] = []
    held_when_made = []

    def source():
        for i in range(30):
            held_when_made.append(sum(r() is not None for r in alive))
            block = Block(i)
            alive.append(weakref.ref(block))
            yield block
            block = None

    for block in one_ahead(source()):
        assert block.i == len(alive) - 1 or block.i == len(alive) - 2
        time.sleep(0.005)  # a slow caller: a thread running ahead would make j+2 meanwhile
        block = None  # the caller lets go of it, as exact_search does
    assert max(held_when_made) <= 1, held_when_made


def test_an_error_in_the_thread_is_raised_in_the_caller():
    def source():
        yield Block(0)
        raise ValueError("block 1 is broken")

    got = []
    with pytest.raises(ValueError, match="block 1 is broken"):
        for block in one_ahead(source()):
            got.append(block.i)
    assert got == [0]


def test_stopping_early_stops_the_thread_and_closes_the_source():
    closed = threading.Event()
    made = []

    def source():
        try:
            for i in range(1000):
                made.append(i)
                yield Block(i)
        finally:
            closed.set()

    before = threading.active_count()
    stream = one_ahead(source())
    for block in stream:
        if block.i == 3:
            break
    stream.close()
    assert closed.is_set() and len(made) <= 5
    assert threading.active_count() == before


def test_an_error_in_the_caller_stops_the_thread():
    closed = threading.Event()

    def source():
        try:
            for i in range(1000):
                yield Block(i)
        finally:
            closed.set()

    def consume():
        for block in one_ahead(source()):
            if block.i == 2:
                raise KeyError("search failed")

    with pytest.raises(KeyError):
        consume()
    assert closed.wait(5)
