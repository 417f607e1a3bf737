"""The thread that reads bags ahead of the model: same batches in the same order, errors
raised where the failing batch is asked for, and no thread left behind."""

import threading
import time

import pytest

from hmil.data.prefetch import Prefetched


def reader_threads() -> int:
    return sum(thread.name == "bag-reader" for thread in threading.enumerate())


def test_batches_arrive_whole_and_in_order_while_the_next_are_read():
    read_at, used_at = {}, {}

    def batches():
        for index in range(6):
            read_at[index] = time.perf_counter()
            yield [index, index + 1]

    prefetched = Prefetched(batches(), depth=2)
    seen = []
    for batch in prefetched:
        used_at[batch[0]] = time.perf_counter()
        seen.append(batch)
        time.sleep(0.05)  # the model computing: the reader runs ahead meanwhile
    assert seen == [[i, i + 1] for i in range(6)]
    assert read_at[1] < used_at[1] - 0.02  # batch 1 was ready before batch 0 was done
    assert reader_threads() == 0


def test_an_error_is_raised_at_the_batch_that_failed():
    def batches():
        yield 0
        yield 1
        raise ValueError("slide 's3' (s3.h5): empty bag")

    seen = []
    with pytest.raises(ValueError, match="slide 's3'"):
        for batch in Prefetched(batches()):
            seen.append(batch)
    assert seen == [0, 1]
    assert reader_threads() == 0


def test_leaving_the_loop_early_stops_the_reader():
    produced = []

    def endless():
        index = 0
        while True:
            produced.append(index)
            yield index
            index += 1

    for batch in Prefetched(endless(), depth=2):
        if batch == 3:
            break
    assert reader_threads() == 0
    assert len(produced) <= 3 + 1 + 2 + 1  # no more than depth ahead (+ the one in hand)


def test_length_is_the_wrapped_loaders():
    assert len(Prefetched([1, 2, 3])) == 3
