"""Checks of mnn.distributed that run inside an MPI job: ``mpiexec -n N python tests/distributed_checks.py``.

Launched by tests/test_distributed.py. Every rank runs every check; a failed
assertion ends the job with a non-zero status (the test reads stderr).
Rank 0 prints ``ok <check>`` for each check passed.
"""

import sys

import numpy as np

from mnn.backend import default_dtype, set_default_dtype
from mnn.distributed import DistributedDataParallel, world
from mnn.losses import CrossEntropyLoss
from mnn.models import MLP
from mnn.optim import SGD, AdamW, param_groups

WORLD = world()
N, RANK = WORLD.size, WORLD.rank
ROWS = 4  # per rank per micro-batch


def report(name: str) -> None:
    if RANK == 0:
        print(f"ok {name}", flush=True)


def gathered(arrays) -> list:
    """Every rank's copy of ``arrays`` (on rank 0; None elsewhere)."""
    return WORLD.gather([np.array(a) for a in arrays])


def all_equal_across_ranks(arrays) -> bool:
    copies = gathered(arrays)
    verdict = None
    if RANK == 0:
        verdict = all(all(np.array_equal(a, b) for a, b in zip(copies[0], other)) for other in copies[1:])
    return WORLD.comm.bcast(verdict, root=0)


def model(seed: int, dtype=np.float32) -> MLP:
    previous = default_dtype()
    set_default_dtype(dtype)
    try:
        return MLP(12, [16, 8], 5, "tanh", 0.0, seed)
    finally:
        set_default_dtype(previous)


def data(dtype, micro_batches: int = 1):
    """The global batch, the same on every rank: ``micro_batches * N * ROWS`` rows."""
    rng = np.random.default_rng(7)
    rows = micro_batches * N * ROWS
    return rng.standard_normal((rows, 12)).astype(dtype), rng.integers(0, 5, rows)


def gradient(net, x, y, weight: float = 1.0) -> None:
    loss = CrossEntropyLoss()
    loss.forward(net.forward(x), y)
    net.backward(loss.backward(weight))


def grads_of(net) -> list:
    return [g.copy() for _, g in net.named_grads()]


def check_broadcast() -> None:
    net = model(seed=100 + RANK)  # different weights on every rank
    assert N == 1 or not all_equal_across_ranks([p for _, p in net.named_parameters()])
    DistributedDataParallel(net)
    assert all_equal_across_ranks([p for _, p in net.named_parameters()])
    report("broadcast")


def check_average_equals_concatenated_batch() -> None:
    x, y = data(np.float64)
    single = model(0, np.float64)
    gradient(single, x, y)  # one process, the whole batch
    net = model(0, np.float64)
    ddp = DistributedDataParallel(net)
    mine = slice(RANK * ROWS, (RANK + 1) * ROWS)
    ddp.backward(_loss_grad(net, x[mine], y[mine]))
    for a, b in zip(grads_of(net), grads_of(single)):
        assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max(), np.abs(a - b).max()
    report("average")


def _loss_grad(net, x, y, weight: float = 1.0):
    loss = CrossEntropyLoss()
    loss.forward(net.forward(x), y)
    return loss.backward(weight)


def check_no_sync_accumulation() -> None:
    micro = 3
    x, y = data(np.float64, micro)
    single = model(0, np.float64)
    gradient(single, x, y)
    net = model(0, np.float64)
    ddp = DistributedDataParallel(net)
    for m in range(micro):
        rows = slice((m * N + RANK) * ROWS, (m * N + RANK + 1) * ROWS)
        if m < micro - 1:
            with ddp.no_sync():
                ddp.backward(_loss_grad(net, x[rows], y[rows], 1.0 / micro))
        else:
            ddp.backward(_loss_grad(net, x[rows], y[rows], 1.0 / micro))
    for a, b in zip(grads_of(net), grads_of(single)):
        assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max(), np.abs(a - b).max()
    report("no_sync")


def check_bucket_caps_agree() -> None:
    x, y = data(np.float32)
    mine = slice(RANK * ROWS, (RANK + 1) * ROWS)
    results = []
    for cap in (0.001, 1.0, 25.0):
        net = model(0)
        ddp = DistributedDataParallel(net, bucket_cap_mb=cap)
        if cap == 0.001:
            assert len(ddp.buckets) > 1  # 1 kB: several buckets for this 0.4 kB-per-row model
        ddp.backward(_loss_grad(net, x[mine], y[mine]))
        results.append(grads_of(net))
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))
    report("buckets")


def check_steps_keep_ranks_equal() -> None:
    for make in (lambda net: SGD(net, lr=0.1, momentum=0.9), lambda net: AdamW(param_groups(net, 0.1), lr=1e-2)):
        net = model(0)
        optimizer = make(net)
        ddp = DistributedDataParallel(net)
        rng = np.random.default_rng(RANK)  # every rank its own data
        for _ in range(5):
            optimizer.zero_grad()
            x, y = rng.standard_normal((ROWS, 12)).astype(np.float32), rng.integers(0, 5, ROWS)
            ddp.backward(_loss_grad(net, x, y))
            optimizer.step()
        assert all_equal_across_ranks([p for _, p in net.named_parameters()])
    report("steps")


def check_mean() -> None:
    mean = WORLD.mean([float(RANK), 1.0])
    assert mean[0] == (N - 1) / 2 and mean[1] == 1.0
    report("mean")


if __name__ == "__main__":
    check_broadcast()
    check_average_equals_concatenated_batch()
    check_no_sync_accumulation()
    check_bucket_caps_agree()
    check_steps_keep_ranks_equal()
    check_mean()
    sys.exit(0)
