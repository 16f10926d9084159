"""Replicas in forked processes (mnn.replica_process) compute the same bits as replicas in threads."""

import os
import signal

import numpy as np
import pytest

from mnn import precision, replica_process
from mnn.errors import ShapeError
from mnn.losses import CrossEntropyLoss
from mnn.models.gpt import GPT, GPTConfig
from mnn.optim import AdamW
from mnn.parallel import DataParallel

pytestmark = pytest.mark.skipif(not replica_process.available(), reason="no fork here")

CONFIG = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.2, bias=True)


def tokens(rows, seed=0):
    rng = np.random.default_rng(seed)
    shape = (rows, CONFIG.block_size)
    return rng.integers(0, CONFIG.vocab_size, shape), rng.integers(0, CONFIG.vocab_size, shape)


def train(processes, steps=3, replicas=2, dtype=np.float32):
    """Losses, weights, replica generator states and evaluation losses after ``steps`` AdamW steps."""
    model = GPT(CONFIG, seed=5, dtype=dtype)
    parallel = DataParallel(model, CrossEntropyLoss(), replicas, processes=processes)
    assert parallel.processes == processes
    optimizer = AdamW(model, lr=1e-2)
    losses = []
    try:
        for step in range(steps):
            x, y = tokens(7, seed=step)
            optimizer.zero_grad()
            losses.append(parallel.forward_backward(x, y, scale=0.5))
            optimizer.step()
        parallel.train(False)
        losses.append(parallel.evaluate(*tokens(5, seed=9)))
        states = {name: rng.bit_generator.state for name, rng in parallel.generators().items()}
        return losses, {k: v.copy() for k, v in model.state_dict().items()}, states
    finally:
        parallel.close()


@pytest.mark.parametrize("replicas", [2, 3])
def test_processes_give_the_bits_of_threads_dropout_and_evaluation_included(replicas):
    by_threads, by_processes = train(False, replicas=replicas), train(True, replicas=replicas)
    assert by_processes[0] == by_threads[0]
    for name, value in by_threads[1].items():
        assert np.array_equal(by_processes[1][name], value), name
    assert by_processes[2] == by_threads[2] and by_threads[2]  # the replicas' dropout streams, as a checkpoint saves


def test_the_sum_leaves_the_childs_gradients_zero_for_its_next_pass():
    """DataParallel zeroes each run of a child's gradients as it adds it (the child no longer zeroes them beside
    the parent's update); the next pass starts from zero: the same gradients twice for the same batch."""
    model = GPT(CONFIG, seed=5)
    parallel = DataParallel(model, CrossEntropyLoss(), 2, processes=True)
    try:
        parallel.train(False)  # no dropout: the same batch gives the same gradients
        x, y = tokens(6)
        sums = []
        for _ in range(3):  # the first pass runs here, then the child forks
            model.zero_grad()
            parallel.forward_backward(x, y)
            assert all(not grad.any() for _, grad in parallel.models[1].named_grads())  # shared with the child
            sums.append([grad.copy() for _, grad in model.named_grads()])
        for first, later in zip(sums[1], sums[2]):
            assert np.array_equal(first, later)
    finally:
        parallel.close()


def test_bf16_products_reach_the_child():
    pytest.importorskip("ml_dtypes")
    precision.set_compute_dtype("bf16")
    try:
        by_threads, by_processes = train(False, steps=2), train(True, steps=2)
    finally:
        precision.set_compute_dtype("float32")
    assert by_processes[0] == by_threads[0]
    assert train(True, steps=2)[0] != by_processes[0]  # float32 differs: the setting did travel


def test_weights_loaded_after_construction_reach_the_child():
    model, other = GPT(CONFIG, seed=5), GPT(CONFIG, seed=6)
    x, y = tokens(6)
    reference = DataParallel(other, CrossEntropyLoss(), 2, processes=False)
    reference.train(False)
    expected = reference.evaluate(x, y)
    parallel = DataParallel(model, CrossEntropyLoss(), 2, processes=True)
    try:
        model.load_state_dict(other.state_dict())
        parallel.train(False)
        assert parallel.evaluate(x, y) == expected
    finally:
        parallel.close()


def test_an_error_in_the_child_is_raised_here_and_the_next_step_runs():
    model = GPT(CONFIG, seed=5)
    parallel = DataParallel(model, CrossEntropyLoss(), 2, processes=True)
    try:
        x, y = tokens(6)
        bad = y.copy()
        bad[4, 0] = CONFIG.vocab_size + 3  # in replica 1's shard only
        with pytest.raises(Exception, match="target") as raised:
            parallel.forward_backward(x, bad)
        threads = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=False)
        with pytest.raises(type(raised.value)) as in_threads:
            threads.forward_backward(x, bad)
        assert str(raised.value) == str(in_threads.value)
        model.zero_grad()
        threads.model.zero_grad()
        assert parallel.forward_backward(x, y) == threads.forward_backward(x, y)
    finally:
        parallel.close()


def test_an_abandoned_pass_is_not_taken_for_the_next():
    parallel = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=True)
    try:
        x, y = tokens(6)
        worker = parallel._workers[1]
        worker.submit("train", *tokens(3, seed=4), 0.5)  # as when Ctrl-C left a step before its answer came
        threads = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=False)
        assert parallel.forward_backward(x, y) == threads.forward_backward(x, y)
        for (name, ours), (_, theirs) in zip(parallel.model.named_grads(), threads.model.named_grads()):
            assert np.array_equal(ours, theirs), name
    finally:
        parallel.close()


def test_the_children_fork_after_the_first_pass_which_runs_here():
    """The first pass runs every replica in this process (loading the kernels the children then share);
    the children exist from its end, and the passes after it run there, with the same bits."""
    parallel = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=True)
    threads = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=False)
    try:
        worker = parallel._workers[1]
        assert not worker.started and worker._process.pid is None
        for step in range(2):
            x, y = tokens(6, seed=step)
            assert parallel.forward_backward(x, y) == threads.forward_backward(x, y), step
            assert worker.started and worker._process.is_alive()
        for (name, ours), (_, theirs) in zip(parallel.model.named_grads(), threads.model.named_grads()):
            assert np.array_equal(ours, theirs), name
    finally:
        parallel.close()
    assert not worker._process.is_alive()


def test_a_first_pass_that_evaluates_forks_children_that_still_train():
    """nanoGPT's loop evaluates before its first step: the children fork inside that no_grad() evaluation,
    and their training passes still keep what backward needs (the same bits as threads)."""
    parallel = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=True)
    threads = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=False)
    try:
        for replicas in (parallel, threads):
            replicas.evaluate(*tokens(6, seed=3))
        assert parallel._workers[1].started
        assert parallel.forward_backward(*tokens(6)) == threads.forward_backward(*tokens(6))
    finally:
        parallel.close()


def test_a_child_forked_under_the_loops_signal_handler_still_ends_on_sigterm():
    """The children fork mid-run, after the training loop turned SIGTERM into a stop request: theirs is the
    default again, so that the exit of the parent (which terminates them) is not left waiting."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    parallel = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=True)
    try:
        parallel.forward_backward(*tokens(6))
        child = parallel._workers[1]._process
        os.kill(child.pid, signal.SIGTERM)
        child.join(5)
        assert child.exitcode == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        parallel.close()


def test_a_child_ends_when_its_parent_is_killed():
    """SIGKILL leaves no orphan: the child has its parent's death signal and does not hold its own pipe open."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    script = ("import os, sys, time, numpy as np\n"
              "from mnn.losses import CrossEntropyLoss\nfrom mnn.models.gpt import GPT, GPTConfig\n"
              "from mnn.parallel import DataParallel\n"
              "config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8)\n"
              "parallel = DataParallel(GPT(config, seed=1), CrossEntropyLoss(), 3, processes=True)\n"
              "x = np.random.default_rng(0).integers(0, 11, (6, 8))\n"
              "parallel.forward_backward(x, x)\n"
              "print(' '.join(str(w._process.pid) for w in parallel._workers.values()), flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 2
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 10
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid)]
    assert not alive, f"replica processes {alive} outlived their killed parent"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_killed_child_is_named_in_one_line():
    parallel = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=True)
    try:
        parallel.forward_backward(*tokens(6))  # the children fork at the end of the first pass
        os.kill(parallel._workers[1]._process.pid, signal.SIGKILL)
        parallel._workers[1]._process.join(5)
        with pytest.raises(RuntimeError, match=r"the process of replica 1 ended \(exit code -9\)"):
            parallel.forward_backward(*tokens(6))
    finally:
        parallel.close()


def test_close_ends_the_children_and_threads_stay_available():
    parallel = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 3, processes=True)
    parallel.forward_backward(*tokens(6))  # the children fork at the end of the first pass
    children = [worker._process for worker in parallel._workers.values()]
    assert all(child.is_alive() for child in children)
    parallel.close()
    assert not any(child.is_alive() for child in children)
    assert not DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=False).processes
    assert not DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 1).processes


def test_shape_errors_from_the_child_keep_their_type():
    parallel = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=True)
    try:
        x, y = tokens(4)
        with pytest.raises(ShapeError):
            parallel.forward_backward(np.concatenate([x, x], axis=1), np.concatenate([y, y], axis=1))
    finally:
        parallel.close()


@pytest.mark.parametrize("platform, environment", [("darwin", {}), ("linux", {"OMPI_COMM_WORLD_SIZE": "2"})],
                         ids=["macos", "under-mpiexec"])
def test_threads_where_a_fork_is_unsafe(platform, environment, monkeypatch):
    monkeypatch.setattr(replica_process.sys, "platform", platform)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert not replica_process.available()
    parallel = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2)
    try:
        assert not parallel.processes and parallel._pool is not None
    finally:
        parallel.close()


def test_an_empty_batch_gives_no_loss_as_with_threads():
    parallel = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), 2, processes=True)
    try:
        x, y = tokens(0)
        assert parallel.forward_backward(x, y) == 0.0
    finally:
        parallel.close()
