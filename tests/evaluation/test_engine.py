"""The engine's search-behind stream: order, bounded look-ahead, errors from either side."""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest

from evalkit.evaluation.engine import search_behind


class Block:
    def __init__(self, i: int) -> None:
        self.i = i
        self.data = np.full(4, i)


def _source(n, made=None, closed=None, fail_at=None):
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"block {i} is broken")
            if made is not None:
                made.append(threading.current_thread().name)
            yield Block(i)
    finally:
        if closed is not None:
            closed.set()


def test_the_search_sees_every_item_in_order_in_another_thread():
    made, seen = [], []

    def search(stream):
        for block in stream:
            seen.append((block.i, threading.current_thread().name))
        return "done"

    assert search_behind(search, _source(50, made)) == "done"
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"evalkit-search"}
    assert set(made) == {threading.current_thread().name}  # the encoder stays in the caller


def test_at_most_the_searched_item_and_the_next_are_alive():
    """Guards the memory bound: block j+2 is made only once the search let go of block j
    (three blocks of vectors alive otherwise)."""
    alive: list[weakref.ref] = []
    held_when_made = []

    def source():
        for i in range(30):
            held_when_made.append(sum(r() is not None for r in alive))
            block = Block(i)
            alive.append(weakref.ref(block))
            yield block
            block = None

    def search(stream):
        for block in stream:
            time.sleep(0.005)  # a slow search: a maker running ahead would make j+2 meanwhile
            block = None  # noqa: F841 - let go, as exact_search does before asking for the next
        return len(alive)

    assert search_behind(search, source()) == 30
    assert max(held_when_made) <= 1, held_when_made


def test_an_error_in_the_search_stops_the_maker_and_is_raised():
    made = []

    def search(stream):
        for block in stream:
            if block.i == 2:
                raise KeyError("search failed")

    before = threading.active_count()
    with pytest.raises(KeyError, match="search failed"):
        search_behind(search, _source(1000, made))
    assert len(made) <= 4
    assert threading.active_count() == before


def test_an_error_while_making_ends_the_search_and_is_raised():
    closed = threading.Event()
    seen = []

    def search(stream):
        seen.extend(block.i for block in stream)
        return "partial"

    before = threading.active_count()
    with pytest.raises(ValueError, match="block 3 is broken"):
        search_behind(search, _source(10, closed=closed, fail_at=3))
    assert seen == [0, 1, 2] and closed.is_set()
    assert threading.active_count() == before


def test_an_empty_stream():
    assert search_behind(lambda stream: [b.i for b in stream], iter([])) == []
