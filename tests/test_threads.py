"""mnn.threads: the memory-bound passes of a step on two threads give the same bits as on one."""

import threading

import numpy as np
import pytest

from mnn import blas, threads
from mnn.backend import xp
from mnn.optim import SGD, AdamW, clip_grad_norm


@pytest.fixture
def two_threads(monkeypatch):
    if xp._module is not np:
        pytest.skip("numpy arrays only")
    monkeypatch.setattr(blas, "_threads", 2)


def test_large_work_runs_on_two_threads_in_order(two_threads):
    names = []
    items = list(range(6))
    results = threads.for_each(lambda i: names.append(threading.current_thread().name) or i * i, items,
                               [threads.MIN_ELEMENTS // 4] * 6)
    assert results == [i * i for i in items]
    assert len(set(names)) == 2  # half the work on this thread, half on the pool's


def test_small_work_or_one_thread_stays_here(two_threads, monkeypatch):
    here = threading.current_thread().name
    names = []
    threads.for_each(lambda i: names.append(threading.current_thread().name), [1, 2], [10, 10])
    monkeypatch.setattr(blas, "_threads", 1)
    threads.for_each(lambda i: names.append(threading.current_thread().name), [1, 2], [threads.MIN_ELEMENTS] * 2)
    assert set(names) == {here}


def test_an_error_on_either_thread_is_raised_after_both_finish(two_threads):
    done = []

    def work(i):
        if i == 3:
            raise ValueError("item 3")
        done.append(i)

    with pytest.raises(ValueError, match="item 3"):
        threads.for_each(work, [0, 1, 2, 3], [threads.MIN_ELEMENTS // 2] * 4)
    assert sorted(done) == [0, 1, 2]


@pytest.mark.parametrize("optimizer", [AdamW, SGD])
def test_a_step_on_two_threads_equals_one_thread_bit_for_bit(optimizer, monkeypatch, compute_path):
    """zero_grad, clipping and the update over 2.6 M numbers: the same bits with one thread or two (numpy's path
    too, whose work buffers each thread must have of its own)."""
    if xp._module is not np:
        pytest.skip("numpy arrays only")
    rng = np.random.default_rng(3)
    shapes = [(512, 1024), (1024, 512), (1024,), (700, 900)]
    start = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    grads_in = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    results = []
    for count in (1, 2):
        monkeypatch.setattr(blas, "_threads", count)
        params = [p.copy() for p in start]
        grads = [np.empty_like(p) for p in params]
        kwargs = {"lr": 0.01, "momentum": 0.9} if optimizer is SGD else {"lr": 0.01, "weight_decay": 0.1}
        opt = optimizer([{"params": [(f"p{i}", p, g) for i, (p, g) in enumerate(zip(params, grads))]}], **kwargs)
        for step in range(3):
            opt.zero_grad()
            assert all(not g.any() for g in grads)
            for g, new in zip(grads, grads_in):
                g += new * (step + 1)
            clip_grad_norm(grads, 5.0)
            opt.step()
        results.append(params)
    for one, two in zip(*results):
        assert np.array_equal(one, two)


def test_runs_merge_neighbours_in_memory_order_and_cut_long_ones():
    buffer = np.arange(30, dtype=np.float32)
    other = np.arange(30, dtype=np.float32) * 2
    a, b, c = buffer[0:10].reshape(2, 5), buffer[10:16], buffer[16:30].reshape(7, 2)
    x, y, z = other[0:10].reshape(2, 5), other[10:16], other[16:30].reshape(7, 2)
    rows = threads.runs([[c, a, b], [z, x, y]], piece=12)  # listed out of order: merged by address
    assert [row[0].size for row in rows] == [10, 10, 10]  # three equal pieces of at most 12
    assert np.array_equal(np.concatenate([row[0] for row in rows]), buffer)
    assert np.array_equal(np.concatenate([row[1] for row in rows]), other)
    for row in rows:
        np.add(row[0], 1, out=row[0])  # views of the same memory
    assert np.array_equal(buffer, np.arange(30) + 1)


def test_a_run_worth_two_threads_is_cut_into_an_even_number_of_equal_aligned_pieces():
    """Two threads then take half of it each (before: pieces of 2^18 and a remainder, so that the 0.8 M
    parameters of the GPT CPU recipe went 524 K to one thread and 286 K to the other)."""
    size = threads.MIN_ELEMENTS + 100
    buffer = np.zeros(size, np.float32)
    rows = threads.runs([[buffer[:1000], buffer[1000:]]])  # shorter than PIECE, but worth two threads
    sizes = [row[0].size for row in rows]
    assert len(sizes) == 2 and sum(sizes) == size and sizes[0] % 16 == 0 and abs(sizes[0] - sizes[1]) <= 32
    rows = threads.runs([[buffer[:1000], buffer[1000:]]], piece=size // 3)  # 4 pieces, not 3
    assert len(rows) == 4 and all(row[0].size % 16 == 0 for row in rows[:-1])
    small = np.zeros(1000, np.float32)
    assert len(threads.runs([[small[:500], small[500:]]])) == 1  # not worth two threads: one piece


def test_the_two_threads_get_the_items_nearest_to_half_of_the_work(two_threads):
    here = threading.current_thread().name
    quarter = threads.MIN_ELEMENTS // 4
    names = {}
    threads.for_each(lambda i: names.__setitem__(i, threading.current_thread().name), [0, 1, 2],
                     [3 * quarter, 10 * quarter, quarter])
    assert names[0] == here and names[1] == names[2] != here  # 3 against 11, not 13 against 1


def test_runs_leave_apart_what_does_not_lie_end_to_end():
    buffer = np.zeros(20, np.float32)
    lone = np.zeros(6, np.float32)
    strided = np.zeros((4, 6), np.float32)[:, ::2]
    gap = [buffer[0:5], buffer[6:10]]  # a gap of one number
    rows = threads.runs([gap + [lone, strided]], piece=100)
    assert len(rows) == 4
    assert rows[-1][0] is strided  # not contiguous: as it is, at the end
    other = np.zeros(20, np.float32)
    mixed = threads.runs([[buffer[0:5], buffer[5:10]], [other[0:5], np.zeros(5, np.float32)]], piece=100)
    assert len(mixed) == 2  # the second column's arrays are not neighbours: no merge


def test_a_merged_run_is_no_more_writable_than_its_arrays():
    buffer = np.zeros(10, np.float32)
    first, second = buffer[:5], buffer[5:]
    second.flags.writeable = False
    (row,) = threads.runs([[first, second]], piece=100)
    assert row[0].size == 10 and not row[0].flags.writeable
