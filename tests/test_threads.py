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
def test_a_step_on_two_threads_equals_one_thread_bit_for_bit(optimizer, monkeypatch):
    """zero_grad, clipping and the update over 2.6 M numbers: the same bits with one thread or two."""
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
