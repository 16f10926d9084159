r"""Data parallelism on one machine: replicas share the weights, each takes a slice of the batch, gradients add up.

Why it pays on a CPU. numpy runs every element-wise operation (GELU,
LayerNorm, softmax, the optimizer) on one core, and OpenBLAS splits each
matrix product over the cores, with a synchronisation per product; on the
small products of a small model that leaves the second core idle or spinning
most of the step. Giving each core a whole slice of the batch instead, each
replica's products on a single BLAS thread, keeps every core busy through the
element-wise work too: numpy releases the GIL inside its loops and in BLAS, so
Python threads run them in parallel. Measured on 2 cores (nanoGPT's CPU
Shakespeare config, batch 12, 2026-11-30): forward and backward 46 ms with
OpenBLAS on two threads, 42 ms as two replicas (medians of six alternating
runs; single runs varied from 31 to 62 ms on the shared machine).

Replicas 1, 2, ... run in forked processes where they can (Linux, numpy
arrays, not under MPI), in threads elsewhere: the threads' contention for
Python's global lock costs about 15% of a GPT step (:mod:`mnn.replica_process`
has the measurement). Both compute the same bits.

On a GPU (CuPy) there is nothing to gain; use one replica there.
"""

from __future__ import annotations

import contextlib
import copy
import os
from concurrent.futures import ThreadPoolExecutor

import numpy

from mnn import blas, replica_process, threads
from mnn.backend import read_scalar, xp
from mnn.module import Module, no_grad


def share_weights(model: Module) -> Module:
    """A replica of ``model``: the same parameter arrays, its own gradient buffers, caches and dropout generators.

    Buffers (BatchNorm's running statistics) are the replica's own copies;
    :class:`DataParallel` copies the model's into them before every pass, as
    ``torch.nn.DataParallel`` broadcasts from device 0.

    Tied parameters stay tied in the replica (one gradient buffer). Each
    distinct ``numpy.random.Generator`` the model's modules hold as ``.rng``
    gets an independent child stream (``Generator.spawn``), so the replica's
    dropout masks differ from the model's.
    """
    replica = copy.deepcopy(model)  # keeps the sharing inside the copy: tied weights, shared generators
    originals = dict(model.named_modules())
    children: dict = {}
    for name, module in replica.named_modules():
        original = originals[name]
        for key in module.params:
            module.params[key] = original.params[key]  # the same array: an update reaches every replica
        rng = getattr(original, "rng", None)
        if isinstance(rng, numpy.random.Generator):
            if id(rng) not in children:
                children[id(rng)] = rng.spawn(1)[0]
            module.rng = children[id(rng)]
    return replica


def _add(pair) -> None:
    """Eq. (1): one replica's gradients added into the model's (``pair``: the model's run, the replica's)."""
    xp.add(pair[0], pair[1], out=pair[0])


def _add_and_zero(pair) -> None:
    """:func:`_add`, then the replica's run zeroed while it is in cache, for its next pass (a replica process's:
    see :meth:`~mnn.replica_process.ReplicaProcess.release`)."""
    _add(pair)
    pair[1].fill(0)


class DataParallel:
    r"""Run ``model`` and ``loss_fn`` on ``replicas`` slices of each batch at once, in threads.

    The gradient. For a loss that is a mean over the $N$ rows of a batch, split
    into shards of $N_k$ rows with shard means $L_k$,

    $$
    L = \frac{1}{N} \sum_{n=1}^{N} \ell_n = \sum_k \frac{N_k}{N}\, L_k
    \qquad\Longrightarrow\qquad
    \frac{\partial L}{\partial \theta} = \sum_k \frac{N_k}{N}\, \frac{\partial L_k}{\partial \theta}. \tag{1}
    $$

    Replica $k$ backpropagates its shard's loss with the upstream gradient
    $N_k / N$ (instead of 1), which is the vector-Jacobian product of the
    weighted sum (1), into gradient buffers of its own; the replicas' buffers are
    then added into the model's, always in the same order. Shard $k$ always runs
    on replica $k$, so the result does not depend on how the threads were
    scheduled: a run is reproducible, and resumable bit for bit.

    Args:
        model: the model; it is replica 0, and its gradients receive the sum (1).
        loss_fn: a loss whose ``backward(dloss)`` takes the upstream gradient
            (every mnn loss); copied for each replica.
        replicas: how many slices (and threads); 1 runs the plain loop.

    Buffers, as in ``torch.nn.DataParallel``: before every pass the model's
    buffers are copied into the replicas', and only the model's own update
    is kept, so BatchNorm's running statistics follow replica 0's shard (the
    replicas' updates from their shards are discarded at the next copy).
    Batch statistics in training are per shard, as there.

    While a call runs, numpy's BLAS is limited to one thread per call
    (threadpoolctl), so that replicas do not oversubscribe the cores.
    """

    def __init__(self, model: Module, loss_fn: Module, replicas: int = 2, processes: bool | None = None) -> None:
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise ValueError(f"DataParallel: replicas must be a positive integer, got {replicas!r}")
        self.model = model
        self.models = [model] + [share_weights(model) for _ in range(replicas - 1)]
        self.losses = [loss_fn] + [copy.deepcopy(loss_fn) for _ in range(replicas - 1)]
        if processes is None:  # processes where they can run (numpy arrays, fork, no MPI); threads elsewhere
            processes = replicas > 1 and xp.__name__ == "numpy" and replica_process.available()
        self.processes = bool(processes) and replicas > 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        spin = replica_process.SPIN_SECONDS if replicas <= cores else 0.0  # polling pays with a core each
        self._workers = {k: replica_process.ReplicaProcess(k, model, self.models[k], self.losses[k], spin)
                         for k in range(1, replicas)} if self.processes else {}
        self._grads = [[grad for _, grad in replica.named_grads()] for replica in self.models]  # fixed arrays
        originals = dict(model.named_modules())
        threaded = [] if self.processes else self.models[1:]  # their params are the model's own arrays
        self._kept = [(array, originals[name].params, key) for replica in threaded
                      for name, module in replica.named_modules() for key, array in module.params.items()]
        threads = replicas > 1 and not self.processes
        self._pool = ThreadPoolExecutor(replicas - 1, thread_name_prefix="mnn-replica") if threads else None
        self._blas = None
        if replicas > 1:
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415 - only needed with replicas

            self._blas = ThreadpoolController()

    @contextlib.contextmanager
    def _one_thread(self):
        """One BLAS thread per replica inside the block: numpy's (threadpoolctl) and mnn's own (:mod:`mnn.blas`)."""
        with self._blas.limit(limits=1, user_api="blas"), blas.limit(1):
            yield

    @property
    def replicas(self) -> int:
        return len(self.models)

    def generators(self, prefix: str = "replica") -> dict:
        """The replicas' own generators (replica 0's are the model's), by name: for checkpoints."""
        from mnn.io.checkpoint import model_generators  # noqa: PLC0415 - checkpoint imports training code

        found = {}
        for index, replica in enumerate(self.models[1:], start=1):
            found.update(model_generators(replica, prefix=f"{prefix}{index}"))
        return found

    def train(self, mode: bool = True) -> None:
        for replica in self.models:
            replica.train(mode)

    def _run(self, k: int, x, y, weight):
        """Replica ``k``'s pass in this process: its shard's mean loss, and with a ``weight`` its backward from it."""
        replica, loss_fn = self.models[k], self.losses[k]
        if weight is not None and k:  # replica 0 is the model: its gradients accumulate as usual
            for (grad,) in threads.runs([self._grads[k]]):
                grad.fill(0)
        loss = read_scalar(loss_fn.forward(replica.forward(x), y))
        if weight is not None:
            replica.backward(loss_fn.backward(weight))
        return loss

    def _map(self, shards: list, weight_of) -> dict:
        """``{k: mean loss of shard k}`` for every non-empty shard, the first here, the others in threads or processes.

        ``weight_of(rows)`` is the upstream gradient of a shard of ``rows`` rows
        (Eq. 1); ``None`` runs forward passes only.
        """
        jobs = [(k, x, y, None if weight_of is None else weight_of(len(x)))
                for k, (x, y) in enumerate(shards) if len(x)]
        if self._workers:
            return self._map_processes(jobs)
        replica_process.refuse_replaced(self._kept, "replicas")
        for replica in self.models[1:]:  # broadcast the buffers from replica 0 (running statistics)
            for (_, own), (_, theirs) in zip(replica.named_buffers(), self.model.named_buffers()):
                own[...] = theirs
        if self._pool is None or len(jobs) == 1:
            return {job[0]: self._run(*job) for job in jobs}
        with self._one_thread():
            futures = {job[0]: self._pool.submit(self._run, *job) for job in jobs[1:]}
            results = {jobs[0][0]: self._run(*jobs[0])}
            results.update((k, future.result()) for k, future in futures.items())
            return results

    def _map_processes(self, jobs: list) -> dict:
        """:meth:`_map` with replicas 1.. in their processes; every pass started is waited for, even after an error.

        The first pass runs every replica here, one after the other, and then
        the processes fork: they share, copy-on-write, the compiled kernels and
        the BLAS code that pass loaded, instead of each loading its own (on the
        GPT CPU recipe the second replica's private memory went from 54 MB to
        20 MB, 2026-12-01). A replica computes the same bits here as in its process.
        """
        if not all(worker.started for worker in self._workers.values()):
            results = {}
            with self._one_thread():
                for k, x, y, weight in jobs:
                    if k:
                        self._workers[k].refresh()
                    results[k] = self._run(k, x, y, weight)
            for worker in self._workers.values():
                worker.start()
            return results
        started, results, failure = [], {}, None
        try:
            for k, x, y, weight in jobs:
                if k:
                    self._workers[k].submit("evaluate" if weight is None else "train", x, y, weight)
                    started.append(k)
            if jobs and jobs[0][0] == 0:
                with self._one_thread():
                    results[0] = self._run(*jobs[0])
        finally:
            for k in started:
                try:
                    results[k] = self._workers[k].result()
                except BaseException as error:  # noqa: BLE001 - raised once every replica has answered
                    failure = failure or error
        if failure is not None:
            raise failure
        return results

    def _shards(self, x, y) -> list:
        if len(x) != len(y):
            raise ValueError(f"DataParallel: {len(x)} inputs but {len(y)} targets")
        bounds = numpy.linspace(0, len(x), self.replicas + 1).round().astype(int)
        return [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def forward_backward(self, x, y, scale: float = 1.0) -> float:
        """Loss of the whole batch ``(x, y)``, and its gradient added into the model's gradients (Eq. 1).

        Both are multiplied by ``scale``: the batch's weight in a larger one
        (a micro-step of gradient accumulation, a rank's slice).
        """
        rows, shards = len(x), self._shards(x, y)
        losses = self._map(shards, lambda n: scale * n / rows)  # Eq. (1): upstream gradient N_k / N
        for k in sorted(losses):
            if k:
                pairs = threads.runs([self._grads[0], self._grads[k]])  # gradients that lie end to end: one call
                worker = self._workers.get(k)
                threads.for_each(_add if worker is None else _add_and_zero, pairs,
                                 [total.size for total, _ in pairs])  # Eq. (1): the sum over replicas, in order
                if worker is not None:
                    worker.release()  # its gradients are read, and zero for its next pass
        return float(sum(losses[k] * len(shards[k][0]) / rows * scale for k in sorted(losses)))  # Eq. (1)

    @no_grad()
    def evaluate(self, x, y) -> float:
        """Loss of the whole batch ``(x, y)``, forward only (nothing is kept for a backward)."""
        rows, shards = len(x), self._shards(x, y)
        losses = self._map(shards, None)
        return float(sum(losses[k] * len(shards[k][0]) / rows for k in sorted(losses)))

    def close(self) -> None:
        """Stop the replicas' threads or processes (a training loop calls it when it ends)."""
        if self._pool is not None:
            self._pool.shutdown()
        for worker in self._workers.values():
            worker.close()
        self._workers = {}
