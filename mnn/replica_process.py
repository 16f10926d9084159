r"""A replica of :class:`~mnn.parallel.DataParallel` in a process of its own, its arrays in shared memory.

Why a process. Replicas in threads share one interpreter, and every numpy
call takes Python's global lock back when it returns. A GPT step makes a
few thousand such calls per replica, and the lock hand-overs between two busy
threads cost more than the Python they protect: measured on 2 cores of an
Intel Xeon (numpy's OpenBLAS 0.3.31 on its SkylakeX kernel, one thread a
replica; nanoGPT's CPU config, 6 windows a replica, 2026-12-01), one replica's forward and
backward takes 19.6 ms alone, 20.1 ms beside the same work in another process,
and 23.8 ms beside it in another thread. A forked process has its own lock.

What is shared, and how. Before the fork, the replica's weights, buffers and
gradients are moved into one anonymous shared mapping (``mmap``), which the
child inherits: both processes see the same pages. Before every pass the
model's current weights and buffers are copied into it (the model's own
arrays stay where they are, so an optimizer or a ``load_state_dict`` that
holds or replaces them keeps working); weights that
:meth:`~mnn.module.Module.flatten_parameters` already put in shared memory
are not copied: the replica uses the model's arrays themselves. The child
writes its gradients into the mapping, :class:`~mnn.parallel.DataParallel`
adds them into the model's, in replica order, as for a thread, and zeroes
each run of them right after adding it, while it is in cache; then it tells
the child, whose next pass starts from them as they are. Before, the child
zeroed them itself while the parent clipped and updated, and took a core from
the parent's second thread (:mod:`mnn.threads`): on nanoGPT's GPU config
(2 cores of an Intel Xeon, alternating blocks in one process, 2026-12-01)
the parent's AdamW update took 8.75 ms with the child zeroing beside it and
6.91 ms without, and the whole step 520.9 ms against 513.1 (on the CPU recipe's
0.8 M parameters, 21.70 against 21.66 ms: no change).
The child computes exactly what the thread would, so the two give the same bits.

Waiting. A process that waits on a pipe sleeps, and waking it takes time: on
the 2-core virtual machines measured here (2026-12-01) a reply 2 ms later
arrived 96 us after it was sent to a sleeping process and 45 us after it was
sent to one polling the pipe. So the parent polls for up to ``SPIN_SECONDS``
before it sleeps on a replica's answer, where every process has a core of its
own (not when replicas outnumber the cores). The child sleeps between passes:
polling there took the core from the parent's second thread (:mod:`mnn.threads`)
and gained nothing measurable.

What travels through the pipe: the shard, the upstream gradient's weight, the
training mode, whether gradients are wanted, the products' precision, the fp16
loss scale and the replica's random generators (dropout), whose new states come
back with the loss, so that a checkpoint taken in the parent holds them.
An error in the child comes back and is raised in the parent (its type and
message, where the error itself cannot cross); a child that
dies is reported in one line. The child ignores Ctrl-C (the parent stops at a
step boundary and closes it) and exits when the parent's end of the pipe closes.
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import signal
import sys
import time

import numpy

from mnn import blas, jit, module, precision, threads
from mnn.backend import read_scalar
from mnn.module import no_grad

_ALIGN = 64  # bytes: each array starts on a cache line
SPIN_SECONDS = 0.005  # how long the parent polls for an answer before it sleeps on the pipe ("Waiting" above)


def available() -> bool:
    """Whether replicas can be processes here: Linux (``fork``; on macOS system frameworks such as
    Accelerate are not safe to use in a forked child) and MPI not running.

    Under ``mpiexec`` a fork after ``MPI_Init`` is unsafe for Open MPI's
    transports, so ranks keep their replicas in threads.
    """
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return False
    return not any(key.startswith(("OMPI_COMM_WORLD", "PMI_RANK", "PMIX_RANK")) for key in os.environ)


def _generators(model) -> list:
    """The distinct random generators of ``model``'s modules (dropout), in the order a checkpoint names them."""
    from mnn.io.checkpoint import model_generators  # noqa: PLC0415 - checkpoint imports training code

    return list(model_generators(model).values())


def _share(replica, model) -> tuple[mmap.mmap, list]:
    """Move ``replica``'s parameters, buffers and gradients into one shared mapping; return it and the copies to make.

    Each distinct array gets one view (tied weights stay tied). The returned
    pairs ``(view, module, kind, key)`` name the model's array that each
    shared weight or buffer is refreshed from before a pass. Parameters come
    first, then buffers, then gradients, each kind in the order its twins (the
    model's arrays) lie in memory; where the twins lie end to end (after
    :meth:`~mnn.module.Module.flatten_parameters`) so do the views, so that the
    refresh and the sum of gradients pass over them in a few calls
    (:func:`mnn.threads.runs`). Every other array starts on a cache line.
    """
    sources = dict(model.named_modules())
    slots, seen, pairs, views, kept = {"params": [], "buffers": [], "grads": []}, set(), [], {}, []
    for name, module in replica.named_modules():
        for kind in ("params", "buffers", "grads"):
            for key, array in getattr(module, kind).items():
                twin = getattr(sources[name], kind)[key]
                if kind == "params" and _in_shared_memory(twin):
                    views[id(array)] = twin  # the model's own array: the child reads what the optimizer writes
                    kept.append((twin, sources[name].params, key))
                elif id(array) not in seen:
                    seen.add(id(array))
                    slots[kind].append((array, twin))
                    if kind != "grads":
                        pairs.append((id(array), sources[name], kind, key))
    for kind in ("params", "grads"):
        slots[kind].sort(key=lambda slot: _address(slot[1]))  # stable: the model's order where it is not numpy
    layout, offset, previous = [], 0, None
    for array, twin in slots["params"] + slots["buffers"] + slots["grads"]:
        adjacent = (previous is not None and _address(twin) and array.dtype == previous[0].dtype
                    and _address(twin) == _address(previous[1]) + previous[1].nbytes)
        if not adjacent:
            offset = -(-offset // _ALIGN) * _ALIGN
        layout.append((array, offset))
        offset += array.nbytes
        previous = (array, twin)
    block = mmap.mmap(-1, max(offset, _ALIGN))  # anonymous and MAP_SHARED: a forked child sees the same pages
    root = numpy.frombuffer(block, numpy.uint8)  # one root, so that neighbouring views merge
    for array, start in layout:
        view = root[start: start + array.nbytes].view(array.dtype).reshape(array.shape)
        view[...] = array
        views[id(array)] = view
    for _, module in replica.named_modules():
        for kind in ("params", "buffers", "grads"):
            table = getattr(module, kind)
            for key, array in table.items():
                table[key] = views[id(array)]
    return block, [(views[ident], module, kind, key) for ident, module, kind, key in pairs], kept


def _in_shared_memory(array) -> bool:
    """Whether ``array`` is a view of an anonymous shared mapping (:meth:`~mnn.module.Module.flatten_parameters`)."""
    if not isinstance(array, numpy.ndarray):
        return False
    base = threads.root(array).base
    base = base.obj if isinstance(base, memoryview) else base  # numpy.frombuffer's
    return isinstance(base, mmap.mmap)


def refuse_replaced(kept: list, replicas: str = "replica processes") -> None:
    """Raise if a model's parameter that ``replicas`` read in place, ``(array, the model's params table, key)``,
    was replaced since: they would read an array the model no longer uses."""
    for array, table, key in kept:
        if table[key] is not array:
            raise RuntimeError(f"DataParallel: the model's parameter {key!r} was replaced after its {replicas} were "
                               "built (flatten_parameters after DataParallel?): build DataParallel after")


def _address(array) -> int:
    """Where ``array``'s numbers start in memory (0 for an array that is not numpy's or not contiguous)."""
    return array.ctypes.data if isinstance(array, numpy.ndarray) and array.flags.c_contiguous else 0


def _end_with_parent(parent: int | None) -> None:
    """SIGTERM for this process when its parent ends, even by SIGKILL (Linux's ``PR_SET_PDEATHSIG``): a
    child that outlived it would wait on a pipe that other forked processes may still hold open."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(0)


class ReplicaProcess:
    """Replica ``index`` of a :class:`~mnn.parallel.DataParallel`, run by a forked child.

    ``replica`` (the parent's mirror of it) keeps views of the shared arrays,
    so the parent reads the child's gradients and buffers from it directly.
    ``spin``: seconds the parent polls for an answer before it sleeps on the
    pipe (:data:`SPIN_SECONDS` where each process has a core, else 0).
    """

    def __init__(self, index: int, model, replica, loss_fn, spin: float = 0.0) -> None:
        self.index, self.replica, self.loss_fn, self.spin = index, replica, loss_fn, spin
        self._block, self._copies, self._kept = _share(replica, model)
        self._grads = [grad for _, grad in replica.named_grads()]
        self._rngs = _generators(replica)
        context = multiprocessing.get_context("fork")
        self._conn, self._child = context.Pipe()
        self._process = context.Process(target=_serve, args=(self._child, replica, loss_fn, self._grads, self._rngs,
                                                             self._conn, os.getpid()),
                                        name=f"mnn-replica{index}", daemon=True)
        self._sent = self._received = 0

    @property
    def started(self) -> bool:
        return self._child is None

    def start(self) -> None:
        """Fork the child. :class:`~mnn.parallel.DataParallel` does it after a first pass in this process, so
        that the child shares (copy-on-write) the compiled kernels and BLAS code that pass loaded."""
        stops = {signal.SIGINT, signal.SIGTERM}
        held = signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # held in the child until it chose its handlers
        try:
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        self._child.close()
        self._child = None

    def refresh(self) -> None:
        """Copy the model's weights and buffers, as they are now, into the replica's shared arrays (weights
        already in shared memory are read by the child where they are)."""
        refuse_replaced(self._kept)
        columns = [[view for view, _, _, _ in self._copies],
                   [getattr(module, table)[key] for _, module, table, key in self._copies]]
        for view, source in threads.runs(columns):  # weights that lie end to end: one copy
            numpy.copyto(view, source)

    def submit(self, kind: str, x, y, weight: float) -> None:
        """Start a pass on the child: ``kind`` is ``"train"`` (forward and backward) or ``"evaluate"``."""
        if not self.started:
            self.start()
        self.refresh()
        scaler = getattr(self.loss_fn, "scaler", None)
        context = (self.replica.training, precision.compute_dtype(), jit.enabled(),
                   None if scaler is None else scaler.scale, [rng.bit_generator.state for rng in self._rngs])
        self._sent += 1
        try:
            self._conn.send((self._sent, kind, x, y, weight, context))
        except (BrokenPipeError, EOFError, OSError):
            self._sent -= 1
            raise self._died() from None

    def release(self) -> None:
        """Tell the child that its gradients were read and zeroed here (:class:`~mnn.parallel.DataParallel` zeroes
        each run of them as it adds it): its next pass need not zero them."""
        if self.started:
            try:
                self._conn.send((0, "zeroed", None, None, None, None))  # no answer comes back
            except (BrokenPipeError, EOFError, OSError):
                raise self._died() from None

    def result(self) -> float:
        """The loss of the pass started by :meth:`submit` (its gradients are in the replica's arrays by then)."""
        while self._received < self._sent:
            _poll(self._conn, self.spin)
            try:
                number, loss, states, error = self._conn.recv()
            except (EOFError, OSError):
                self._received = self._sent
                raise self._died() from None
            except Exception as unreadable:  # noqa: BLE001 - an answer (an error) that could not be rebuilt here
                self._received = self._sent
                raise RuntimeError(f"replica {self.index}: its answer could not be read ({unreadable})") from None
            self._received = number
            if number == self._sent:  # an older answer belongs to a pass the parent abandoned (Ctrl-C)
                for rng, state in zip(self._rngs, states):
                    rng.bit_generator.state = state  # drawn from, as a thread's would have been, even on an error
                if error is not None:
                    raise error
                return loss
        raise RuntimeError(f"replica {self.index}: no pass was started")

    def _died(self) -> RuntimeError:
        self._process.join(timeout=1.0)
        return RuntimeError(f"DataParallel: the process of replica {self.index} ended "
                            f"(exit code {self._process.exitcode}); the step cannot finish")

    def close(self) -> None:
        if self._child is not None:  # never started
            self._child.close()
            self._child = None
        elif self._process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=5.0)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(timeout=5.0)
        self._conn.close()


def _poll(conn, seconds: float) -> None:
    """Poll ``conn`` for up to ``seconds`` (awake: "Waiting" above); the caller's read then sleeps if need be."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if conn.poll():
            return


def _serve(conn, replica, loss_fn, grads, rngs, parent_end=None, parent=None) -> None:
    """The child: run each pass the parent sends until the pipe closes or says stop, or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent at a step boundary; it closes us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # forked mid-run: not the training loop's stop request
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # blocked by start() until now
    if parent_end is not None:
        parent_end.close()  # the parent's end, inherited by the fork: only the parent may keep the pipe open
    _end_with_parent(parent)
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    threadpool_limits(limits=1, user_api="blas")  # one core per replica, as each thread has
    blas.set_threads(1)  # and no split of MKL's products (mnn.blas)
    module._grad_enabled = True  # forked mid-run, perhaps inside an evaluation's no_grad(): each pass chooses
    zeroed = False
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if message is None:
            return
        if message[1] == "zeroed":  # the parent read our gradients and zeroed them
            zeroed = True
            continue
        number, kind, x, y, weight, (training, dtype, compiled, loss_scale, states) = message
        try:
            if replica.training != training:
                replica.train(training)
            precision.set_compute_dtype(dtype)
            jit.set_enabled(compiled)
            if loss_scale is not None:
                loss_fn.scaler.scale = loss_scale
            for rng, state in zip(rngs, states):
                rng.bit_generator.state = state
            if kind == "train":
                if not zeroed:
                    for (grad,) in threads.runs([grads]):
                        grad.fill(0)
                zeroed = False
                loss = read_scalar(loss_fn.forward(replica.forward(x), y))
                replica.backward(loss_fn.backward(weight))
            else:
                with no_grad():
                    loss = read_scalar(loss_fn.forward(replica.forward(x), y))
            answer = (number, loss, [rng.bit_generator.state for rng in rngs], None)
        except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent
            answer = (number, None, [rng.bit_generator.state for rng in rngs], error)
        try:
            conn.send(answer)
        except (BrokenPipeError, OSError):
            return
        except Exception:  # noqa: BLE001 - an error that cannot cross the pipe: its type and message do
            error = RuntimeError(f"in replica process: {type(answer[3]).__name__}: {answer[3]}")
            conn.send((number, None, answer[2], error))

