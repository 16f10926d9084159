r"""Data parallelism over MPI: one process (rank) per core or machine, gradients averaged with ``Allreduce``.

Started by ``mpiexec -n N mnn train ...`` (or any MPI launcher), every rank
builds the same model, :class:`DistributedDataParallel` copies rank 0's
weights to the others, and each step every rank takes the gradient of its
own slice of the batch; the gradients are then summed over the ranks in
place (``Allreduce`` on flat buckets) and divided by $N$. mpi4py is imported
only when the launcher says more than one rank runs (importing it starts
MPI); one process needs nothing from this module but :func:`world`, whose
answer is then a world of one.

The gradient. Rank $r$ holds rows $\mathcal{B}_r$ of a global batch
$\mathcal{B}$ of $|\mathcal{B}|$ rows, and backpropagates its loss with the
upstream gradient $w_r = N |\mathcal{B}_r| / |\mathcal{B}|$ (1 when every
rank has the same number of rows); the average over the ranks is then the
gradient of the mean over the global batch:

$$
\frac{1}{N} \sum_{r=0}^{N-1} w_r\, \frac{\partial L_r}{\partial \theta}
= \sum_{r} \frac{|\mathcal{B}_r|}{|\mathcal{B}|}\, \frac{\partial L_r}{\partial \theta}
= \frac{\partial L}{\partial \theta}. \tag{1}
$$

Every rank receives the same sums (a collective's result is the same
everywhere), so the weights stay equal on every rank without another
broadcast.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy

from mnn.errors import MnnError

SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # Open MPI's mpiexec; MPICH's (Hydra) and Slurm's PMI
BLAS_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
POLL_SECONDS = 0.002  # a rank waiting for rank 0 sleeps between tests instead of spinning on a core


def launched_size() -> int:
    """The number of ranks the launcher started, from its environment (1 without a launcher)."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


class World:
    """The ranks of this job, and the few collectives training needs.

    A world of one (``comm`` None) answers every call locally, so the same
    code runs with and without MPI.

    Attributes:
        rank: this process's number, 0 to ``size - 1``; rank 0 logs and writes files.
        size: the number of ranks $N$.
        local_size: ranks on this machine (they share its cores).
    """

    def __init__(self, comm=None) -> None:
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        local = None if comm is None else comm.Split_type(self._mpi().COMM_TYPE_SHARED)
        self.local_size, self.local_rank = (1, 0) if local is None else (local.Get_size(), local.Get_rank())
        self.blas_limit, self._nccl = None, None

    @staticmethod
    def _mpi():
        from mpi4py import MPI  # noqa: PLC0415 - importing it initialises MPI

        return MPI

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, buffer) -> None:
        """Sum ``buffer`` (a contiguous array) over the ranks, in place: ``Allreduce(IN_PLACE, buffer)``.

        A CuPy array is summed on the devices by NCCL (:class:`NcclSum`).
        """
        if self.comm is None:
            return
        if isinstance(buffer, numpy.ndarray):
            self.comm.Allreduce(self._mpi().IN_PLACE, buffer, op=self._mpi().SUM)
        else:
            self._nccl = self._nccl or NcclSum(self)
            self._nccl(buffer)

    def mean(self, values) -> numpy.ndarray:
        """The float64 mean over the ranks of ``values`` (a number or a list of them)."""
        buffer = numpy.array(values, dtype=numpy.float64, ndmin=1)
        if self.comm is None:
            return buffer
        self.allreduce_sum(buffer)
        return buffer / self.size

    def broadcast(self, array) -> None:
        """Overwrite ``array`` (contiguous) with rank 0's, in place: ``Bcast`` (a CuPy array through the host)."""
        if self.comm is None:
            return
        if isinstance(array, numpy.ndarray):
            self.comm.Bcast(array, root=0)
        else:  # the pip Open MPI is not CUDA-aware: parameters (once) and buffers are small enough to copy
            host = array.get()
            self.comm.Bcast(host, root=0)
            array.set(host)

    def gather(self, value):
        """Rank 0: the list of every rank's ``value`` (small, pickled: checkpoint metadata); others: None."""
        if self.comm is None:
            return [value]
        return self.comm.gather(value, root=0)

    def wait_for_all(self, flag: bool = False) -> bool:
        """Wait until every rank arrives (rank 0 after evaluating or writing); True if any rank's ``flag`` is.

        The wait is a non-blocking ``Iallreduce`` tested every ``POLL_SECONDS``:
        a blocking collective would spin on the core rank 0 needs meanwhile.
        """
        if self.comm is None:
            return flag
        buffer = numpy.array([1.0 if flag else 0.0])
        request = self.comm.Iallreduce(self._mpi().IN_PLACE, buffer, op=self._mpi().MAX)
        while not request.Test():
            time.sleep(POLL_SECONDS)
        return bool(buffer[0])

    @contextlib.contextmanager
    def main_alone(self):
        """Rank 0 works while the others sleep (evaluation): its BLAS may use every core of its machine."""
        if self.blas_limit is None or self.size == 1:
            yield
            return
        from threadpoolctl import threadpool_limits  # noqa: PLC0415

        with threadpool_limits(limits=blas_threads(1), user_api="blas"):
            yield

    def fail(self, message: str, code: int = 2) -> None:
        """End the whole job: print one line (rank 0's, when every rank fails at once) and abort every rank."""
        if self.rank:
            time.sleep(1.0)  # an error every rank raised is reported by rank 0, whose abort ends this one
            message = f"rank {self.rank}: {message}"
        print(f"mnn: error: {message}", file=sys.stderr, flush=True)
        if self.comm is not None:
            self.comm.Abort(code)
        raise SystemExit(code)


class NcclSum:
    """Sum CuPy arrays over the ranks with NCCL (``--device gpu``): one GPU a rank, the NCCL id sent over MPI.

    Designed for one rank per GPU (rank ``local_rank`` of a machine takes
    device ``local_rank``); not yet run, for want of machines with several GPUs.
    """

    def __init__(self, group: World) -> None:
        import cupy  # noqa: PLC0415
        from cupy.cuda import nccl  # noqa: PLC0415

        if group.local_rank >= cupy.cuda.runtime.getDeviceCount():
            raise MnnError(f"{group.local_size} ranks on this machine but {cupy.cuda.runtime.getDeviceCount()} "
                           "GPU(s): start one rank per GPU")
        self.cupy, self.nccl = cupy, nccl
        identifier = group.comm.bcast(nccl.get_unique_id() if group.is_main else None, root=0)
        self.comm = nccl.NcclCommunicator(group.size, identifier, group.rank)
        self.types = {numpy.dtype(numpy.float32): nccl.NCCL_FLOAT32, numpy.dtype(numpy.float64): nccl.NCCL_FLOAT64,
                      numpy.dtype(numpy.float16): nccl.NCCL_FLOAT16}

    def __call__(self, buffer) -> None:
        stream = self.cupy.cuda.get_current_stream()
        self.comm.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, self.types[buffer.dtype],
                            self.nccl.NCCL_SUM, stream.ptr)
        stream.synchronize()


_WORLD: World | None = None


def world() -> World:
    """The job's :class:`World`; under a launcher with more than one rank, MPI starts here (once)."""
    global _WORLD  # noqa: PLW0603 - one world per process, as MPI_COMM_WORLD
    if _WORLD is None:
        if launched_size() == 1:
            _WORLD = World()
        else:
            try:
                from mpi4py import MPI  # noqa: PLC0415
            except ImportError:
                raise MnnError(f"{launched_size()} ranks were launched but mpi4py is not installed: "
                               "pip install 'manual-nn[mpi]'") from None
            _WORLD = World(MPI.COMM_WORLD)
            _WORLD.blas_limit = limit_blas_threads(_WORLD)
            from mnn import backend  # noqa: PLC0415

            if backend.xp.__name__ == "cupy":  # one GPU a rank, chosen before any array is made
                backend.xp.cuda.Device(_WORLD.local_rank).use()
    return _WORLD


def active() -> bool:
    """True once MPI runs with more than one rank in this process."""
    return _WORLD is not None and _WORLD.size > 1


def is_worker() -> bool:
    """True in every rank but rank 0 of a job of several ranks (they neither log nor write files)."""
    return _WORLD is not None and _WORLD.rank > 0


def blas_threads(local_size: int, cores: int | None = None) -> int | None:
    """BLAS threads per rank: the machine's cores shared out among its ranks; None when the user set them."""
    if any(os.environ.get(name) for name in BLAS_VARIABLES):
        return None
    return max(1, (cores or os.cpu_count() or 1) // local_size)


def limit_blas_threads(group: World):
    """Limit numpy's BLAS to :func:`blas_threads` threads in this rank (threadpoolctl); the limiter, or None."""
    threads = blas_threads(group.local_size)
    if threads is None:
        return None
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    return threadpool_limits(limits=threads, user_api="blas")


def fit_replicas(config, given: bool, group: World) -> None:
    """Thread replicas (``--replicas``) per rank: 1 unless given; refuse more threads than the machine's cores.

    Ranks already take one core each; threads inside a rank pay only when a
    machine has more cores than ranks.
    """
    if group.size == 1 or not hasattr(config, "replicas"):
        return
    if not given:
        config.replicas = 1
        return
    cores = os.cpu_count() or 1
    if config.replicas * group.local_size > cores:
        raise MnnError(f"--replicas {config.replicas} with {group.local_size} ranks on this machine makes "
                       f"{config.replicas * group.local_size} threads for its {cores} cores: give --replicas "
                       f"{max(1, cores // group.local_size)} or leave it out (ranks already use every core)")


def shard(rows: int, index: int, parts: int) -> slice:
    """The ``index``-th of ``parts`` near-equal runs of a batch of ``rows`` rows (as :class:`~mnn.parallel.DataParallel` cuts)."""
    bounds = numpy.linspace(0, rows, parts + 1).round().astype(int)
    return slice(int(bounds[index]), int(bounds[index + 1]))


class DistributedDataParallel:
    r"""Keep ``module``'s weights equal on every rank and average its gradients over the ranks (Eq. 1).

    As ``torch.nn.parallel.DistributedDataParallel``: rank 0's parameters and
    buffers are broadcast when it is built (ranks seeded differently end up
    identical); :meth:`backward` runs the module's backward and then reduces
    the gradients, unless inside :meth:`no_sync`, which lets gradients
    accumulate locally over micro-steps: the first backward outside it
    reduces the sum of them all. Buffers (BatchNorm's running statistics) are
    broadcast from rank 0 before every :meth:`forward` (``broadcast_buffers``).

    The reduction: the gradients are copied, in the same order on every rank,
    into flat buckets of at most ``bucket_cap_mb`` megabytes (one dtype per
    bucket, float32 by default), each summed with one in-place buffer
    ``Allreduce`` and divided by $N$, then copied back. Buckets of a few
    megabytes keep the per-call latency small against the bytes moved; a
    gradient larger than the cap gets a bucket of its own.

    Args:
        module: the model (every rank builds it the same way).
        group: the :class:`World` (default: :func:`world`).
        bucket_cap_mb: the size limit of a bucket, in megabytes ($10^6$ bytes).
        broadcast_buffers: copy rank 0's buffers to every rank before each forward.
    """

    def __init__(self, module, group: World | None = None, bucket_cap_mb: float = 25.0,
                 broadcast_buffers: bool = True) -> None:
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        self.module, self.world = module, group or world()
        self.broadcast_buffers, self.require_backward_grad_sync = broadcast_buffers, True
        self.buckets = plan_buckets([grad for _, grad in module.named_grads()], bucket_cap_mb * 1e6)
        for _, param in module.named_parameters():
            self.world.broadcast(param)
        self.sync_buffers()

    def sync_buffers(self) -> None:
        """Copy rank 0's buffers into every rank's (running statistics; nothing to do without buffers)."""
        if self.broadcast_buffers:
            for _, buffer in self.module.named_buffers():
                self.world.broadcast(buffer)

    def forward(self, *inputs):
        self.sync_buffers()
        return self.module.forward(*inputs)

    def backward(self, dy):
        """The module's backward (gradients accumulate), then :meth:`finish_backward`."""
        dx = self.module.backward(dy)
        self.finish_backward()
        return dx

    def finish_backward(self) -> None:
        """:meth:`reduce_gradients`, unless inside :meth:`no_sync` (for code that ran the backward itself)."""
        if self.require_backward_grad_sync:
            self.reduce_gradients()

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate locally; the next one outside reduces the accumulated sum."""
        previous, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous

    def reduce_gradients(self) -> None:
        """Replace every gradient by its mean over the ranks (Eq. 1), bucket by bucket."""
        if self.world.size == 1:
            return
        for flat, grads in self.buckets:
            offset = 0
            for grad in grads:
                flat[offset:offset + grad.size] = grad.reshape(-1)
                offset += grad.size
            self.world.allreduce_sum(flat)
            flat *= flat.dtype.type(1.0 / self.world.size)  # Eq. (1): the mean over the ranks
            offset = 0
            for grad in grads:
                grad[...] = flat[offset:offset + grad.size].reshape(grad.shape)
                offset += grad.size


def plan_buckets(grads: list, cap_bytes: float) -> list:
    """``[(flat buffer, [gradients])]``: consecutive gradients of one dtype, at most ``cap_bytes`` a bucket."""
    buckets, current, used = [], [], 0
    for grad in grads:
        if current and (grad.dtype != current[0].dtype or used + grad.nbytes > cap_bytes):
            buckets.append(current)
            current, used = [], 0
        current.append(grad)
        used += grad.nbytes
    if current:
        buckets.append(current)
    from mnn.backend import xp  # noqa: PLC0415

    return [(xp.empty(sum(g.size for g in group), dtype=group[0].dtype), group) for group in buckets]
