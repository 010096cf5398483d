"""common/ordered_work.py: work done a few items at once, results in the items' order."""

from __future__ import annotations

import threading
import time

import pytest

from common.ordered_work import in_order, usable_cores


def test_results_come_back_in_order_with_no_more_than_the_threads_worth_in_hand() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.02 * (5 - i))  # the first items are the slowest
        return i * i

    out = []
    for result in in_order(work, range(6), threads=2):
        out.append(result)
        assert len(started) <= len(out) + 2  # never more than two items ahead of the consumer
    assert out == [i * i for i in range(6)]


def test_two_threads_work_on_two_items_at_once() -> None:
    both_running = threading.Barrier(2, timeout=10)  # breaks (and fails the test) unless two meet

    def work(i: int) -> int:
        both_running.wait()
        return i

    assert list(in_order(work, range(6), threads=2)) == list(range(6))


def test_a_failing_item_raises_at_its_place_after_the_running_ones_finish() -> None:
    finished: list[int] = []

    def work(i: int) -> int:
        if i == 2:
            raise ValueError("item 2 is bad")
        time.sleep(0.05)
        finished.append(i)
        return i

    taken = []
    with pytest.raises(ValueError, match="item 2"):
        for result in in_order(work, range(10), threads=2):
            taken.append(result)
    assert taken == [0, 1]
    assert max(finished) <= 3  # the items after the failure were never started but the one beside it


def test_usable_cores_is_between_one_and_the_limit() -> None:
    assert usable_cores(1) == 1
    assert 1 <= usable_cores(64) <= 64
