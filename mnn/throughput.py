r"""How fast a training step runs against how fast this machine multiplies: achieved GFLOP/s and MFU.

The model FLOPs utilisation of a step is

$$
\mathrm{MFU} = \frac{F_{\mathrm{step}} / t_{\mathrm{step}}}{R_{\mathrm{peak}}},
$$

with $F_{\mathrm{step}}$ the matrix-product FLOPs of one forward and one
backward pass, counted from the layers' equations (:func:`mnn.summary.summary`),
$t_{\mathrm{step}}$ the measured time per step (element-wise work, the
optimizer and Python included: everything a step costs), and
$R_{\mathrm{peak}}$ this machine's own single-precision matrix-product
rate, measured, not read from a datasheet: the fastest of five
$2048 \times 2048 \times 2048$ float32 products through numpy's BLAS (on a
shared machine other work only ever slows a product down, so the fastest is
the nearest to the machine's own rate; their median is kept beside it) at the
thread count it has when the rate is first asked for (a
:class:`~mnn.parallel.DataParallel` run shares that many cores among its
replicas). The rate is measured once per machine (host, CPU, BLAS library,
version, kernel and thread count) and kept in ``peak_sgemm.json`` in mnn's
cache folder (:func:`mnn.data.cache_dir`); ``MNN_PEAK_GFLOPS`` sets it
instead (no measurement). Training logs call :func:`speed` only when they
print a line, so a run that prints nothing measures nothing. On a GPU
(``--device gpu``) the log line keeps its milliseconds alone: the probe is
for the CPU's BLAS.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import weakref

import numpy

PROBE_SIZE = 2048  # n of the n x n x n SGEMM: large enough for BLAS's full rate, 17 GFLOP a product
PROBE_REPEATS = 5  # timed products (after one to warm up); the fastest is the peak
_peaks: dict = {}  # machine key -> GFLOP/s, for this process
_step_flops = weakref.WeakKeyDictionary()  # task -> FLOPs of one of its steps


def blas() -> dict:
    """numpy's BLAS as threadpoolctl sees it: ``library``, ``version``, ``kernel``, ``threads``."""
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415 - a dependency, imported when asked

        info = next(entry for entry in threadpool_info() if entry.get("user_api") == "blas")
    except (ImportError, StopIteration):
        return {"library": "unknown", "version": "", "kernel": "", "threads": os.cpu_count() or 1}
    return {"library": info.get("internal_api", ""), "version": info.get("version", ""),
            "kernel": info.get("architecture", ""), "threads": int(info.get("num_threads", 1))}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What the peak rate depends on: ``host | CPU | BLAS library version kernel | threads`` (and ``| mkl``
    where mnn's products run on MKL, :mod:`mnn.blas`)."""
    from mnn import blas as products  # noqa: PLC0415

    b = blas()
    key = f"{platform.node()} | {cpu_model()} | {b['library']} {b['version']} {b['kernel']} | {b['threads']} threads"
    return key + (" | mkl" if products.library() == "mkl" else "")


def measure_sgemm(size: int = PROBE_SIZE, repeats: int = PROBE_REPEATS) -> dict:
    """The fastest and the median rate of ``repeats`` float32 products ``(size, size) @ (size, size)``, GFLOP/s.

    With numpy's BLAS, one product on its threads. With MKL (:mod:`mnn.blas`),
    which mnn runs one thread per replica, one product per thread at once,
    each on one thread: the rate of the cores together, as the replicas use them.
    """
    from mnn import blas as products  # noqa: PLC0415

    if products.library() == "mkl":
        return _measure_threads(size, repeats, products)
    rng = numpy.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=numpy.float32) for _ in range(2))
    out = numpy.empty((size, size), dtype=numpy.float32)
    numpy.matmul(a, b, out=out)  # warm up: pages touched, BLAS threads started
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        numpy.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    flops = 2 * size**3
    return {"gflops": flops / min(times) / 1e9, "median_gflops": flops / statistics.median(times) / 1e9}


def _measure_threads(size: int, repeats: int, products) -> dict:
    """:func:`measure_sgemm` for MKL: :func:`mnn.blas.threads` products at once, one thread each."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    count = products.threads()
    rng = numpy.random.default_rng(0)
    operands = [[rng.standard_normal((size, size), dtype=numpy.float32) for _ in range(2)]
                + [numpy.empty((size, size), dtype=numpy.float32)] for _ in range(count)]
    times = []
    with products.limit(1), ThreadPoolExecutor(count) as pool:
        for repeat in range(repeats + 1):  # the first warms up
            start = time.perf_counter()
            list(pool.map(lambda ops: products.matmul(ops[0], ops[1], out=ops[2]), operands))
            if repeat:
                times.append(time.perf_counter() - start)
    flops = count * 2 * size**3
    return {"gflops": flops / min(times) / 1e9, "median_gflops": flops / statistics.median(times) / 1e9}


def peak_gflops() -> float:
    """This machine's peak SGEMM rate: ``$MNN_PEAK_GFLOPS``, else cached, else measured now and cached."""
    if os.environ.get("MNN_PEAK_GFLOPS"):
        return float(os.environ["MNN_PEAK_GFLOPS"])
    key = machine_key()
    if key in _peaks:
        return _peaks[key]
    from mnn.data.download import cache_dir  # noqa: PLC0415

    path = cache_dir() / "peak_sgemm.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("gflops"), (int, float)) and entry["gflops"] > 0:
        _peaks[key] = float(entry["gflops"])
        return _peaks[key]
    return _remember(key, measure_sgemm(), known, path)


def _remember(key: str, measured: dict, known: dict, path) -> float:
    """Keep ``measured`` as the peak of ``key`` in this process and in the cache file; the peak."""
    _peaks[key] = measured["gflops"]
    known[key] = {**{name: round(value, 1) for name, value in measured.items()}, "size": PROBE_SIZE,
                  "repeats": PROBE_REPEATS, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(known, indent=1) + "\n")
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only cache: measured again by the next process
    return _peaks[key]


def remeasure_peak(slower_than: float) -> float:
    """Measure the peak again and keep the faster of it and ``slower_than`` (a peak that proved too low).

    A step's matrix products cannot run faster than the machine multiplies, so
    a step that achieved more than the kept peak shows that the peak was taken
    while other work held the cores; the new measurement replaces it only if
    it is faster. ``$MNN_PEAK_GFLOPS`` is never overridden.
    """
    if os.environ.get("MNN_PEAK_GFLOPS"):
        return float(os.environ["MNN_PEAK_GFLOPS"])
    from mnn.data.download import cache_dir  # noqa: PLC0415

    path = cache_dir() / "peak_sgemm.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    measured = measure_sgemm()
    if measured["gflops"] <= slower_than:
        return slower_than
    return _remember(machine_key(), measured, known if isinstance(known, dict) else {}, path)


def achieved(flops_per_step: float, ms_per_step: float) -> tuple[float, float]:
    """``(GFLOP/s, MFU)`` of steps of ``flops_per_step`` FLOPs taking ``ms_per_step`` milliseconds."""
    rate = flops_per_step / (ms_per_step / 1000.0) / 1e9
    peak = peak_gflops()
    if rate > peak:  # more than the machine's peak: that peak was measured on busy cores
        peak = remeasure_peak(peak)
    return rate, rate / peak


def task_step_flops(task) -> int:
    """Matrix-product FLOPs of one optimizer step of a training task in this process (counted once per task).

    A step runs ``grad_accum`` micro-batches of ``batch_size`` rows (per rank
    under MPI): windows of ``block_size`` ids for a language model, images of
    the training set's shape for a classifier. The count is taken on one row
    and multiplied (every layer's count is linear in the batch), so the
    first log line costs one forward of one row, not of a whole batch.
    """
    if task not in _step_flops:
        from mnn.summary import summary  # noqa: PLC0415

        config = task.config
        row = (config.block_size,) if hasattr(config, "block_size") else tuple(task.x_train.shape[1:])
        per_row = summary(task.model, (1, *row)).step_flops  # every layer's count is linear in the batch
        _step_flops[task] = per_row * config.batch_size * int(getattr(config, "grad_accum", 1))
    return _step_flops[task]


def speed(ms_per_step: float, task=None) -> str:
    """``"16.2 ms/step | 245 GFLOP/s | MFU 56%"``: the log line's speed; the milliseconds alone on a GPU,
    before any step was timed, or without a task."""
    from mnn.backend import xp  # noqa: PLC0415

    text = f"{ms_per_step:.1f} ms/step"
    if task is None or not ms_per_step > 0 or xp.__name__ != "numpy":
        return text
    rate, utilisation = achieved(task_step_flops(task), ms_per_step)
    return f"{text} | {rate:.0f} GFLOP/s | MFU {100 * utilisation:.0f}%"
