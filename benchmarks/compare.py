"""mnn against PyTorch on the CPU, side by side: ``python -m benchmarks.compare [--quick] [--threads 2]``.

For every case of :mod:`benchmarks.cases`, in one run of this command:

1. each side (mnn, PyTorch, and the matrix-product floor in numpy) is built
   in a worker process of its own (:mod:`benchmarks.workers` says why) from
   the same weights and data, with the same thread count
   (``torch.set_num_threads`` and threadpoolctl's limit on numpy's BLAS and
   every OpenMP pool); PyTorch runs with glibc's default malloc settings, as
   its users run it (``--torch-malloc mnn`` gives it the ones mnn sets);
2. the first step of each framework is checked: same loss (so the comparison
   is of equal work), and it doubles as warm-up, with more warm-up steps after;
3. the timed steps are interleaved in blocks of ~0.5 s, mnn / torch / floor,
   the order reversed every other round, so a change of machine load hits all
   sides alike (see :func:`time_interleaved`); the figure is the median of
   ``--steps`` steps, or of as many as fill ``--min-seconds`` (3 s) on the
   slowest side, whichever is more: a 1 ms MLP step gets thousands of steps
   in about six blocks per side, not one block (``--quick``: a few steps);
4. mnn runs as installed: with numba, its compiled loops (:mod:`mnn.jit`)
   are on, and each case records whether they were (``mnn_jit``);
   ``MNN_JIT=0 python -m benchmarks.compare`` gives the pure-numpy figures;
5. peak memory is measured in a fresh subprocess per framework per case: the
   high-water mark of the resident set (``VmHWM``, reset through
   ``/proc/self/clear_refs``; ``ru_maxrss`` where that is not available) minus
   the resident set after the imports and the data, so it counts the model,
   its gradients, the optimizer state, the activations and any workspace;
   mnn's replicas in forked processes (:mod:`mnn.replica_process`) add the
   memory only they hold after the steps (their private pages: activations,
   their own compiled kernels, pages copied on write) above what they held at
   the fork; what they share with the parent is counted once, in the parent;

The machine is shared and noisy: the ratios are the figures, not the times.
Writes ``benchmarks/results.json`` and ``benchmarks/results.png`` (or
``--out DIR``) and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy

from benchmarks import kernel
from benchmarks.cases import all_cases
from benchmarks.workers import Channel, Worker, environment, in_turns, side_environment

FRAMEWORKS = ("mnn", "torch")
SIDES = ("mnn", "torch", "floor")  # every case's; a case may add its extra_sides (torch_compile)
# The bars (ratios mnn / torch); memory bars compare peak resident memory.
BARS = {"mlp_train_b64": 0.7, "mlp_train_b512": 1.0, "gpt_train": 1.0, "gpt_large_train": 1.0,
        "cnn_train": 1.0, "lstm_train_b12": 1.0, "lstm_train_b32": 1.0}  # issues 14, 15 and 17
COMPILED_BARS = ("gpt_train", "gpt_large_train")  # mnn <= torch.compile (issue 17)
MEMORY_BARS = ("gpt_train",)
LOSS_RTOL = 1e-4
BLOCK_SECONDS = 0.5
MIN_SECONDS = 3.0  # timed seconds per side at least: several blocks each, even for a 1 ms step
SETTLE_SECONDS = 0.25  # between blocks: the last side's spinning BLAS/OpenMP threads go to sleep (OpenBLAS: ~0.1 s)
HERE = Path(__file__).resolve().parent


def set_threads(threads: int):
    """Pin numpy's BLAS and PyTorch to ``threads`` threads; returns the threadpoolctl limiter (keep it)."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    limiter = threadpool_limits(limits=threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return limiter


def time_interleaved(sides: dict, steps: int, warmup: int, block_seconds: float = BLOCK_SECONDS,
                     min_seconds: float = 0.0):
    """Warm up, then time ``steps`` steps of every side in blocks, in the order A B C, then C B A, ...

    ``sides`` maps a name to a :class:`~benchmarks.workers.Worker` (each side
    in its own process). Returns ``({side: [seconds per step, ...]}, steps per block)``.
    ``steps`` grows to fill ``min_seconds`` on the slowest side if it would not.

    A block holds as many steps as fill about ``block_seconds`` (one step for
    a slow case). Before each block the parent waits ``SETTLE_SECONDS``, so the
    worker threads of the side that ran last (OpenBLAS spins ~0.1 s after a
    product, OpenMP pools spin too) have parked and the block's steps have the
    cores; blocks still alternate often, so a change of machine load hits
    every side alike.
    """
    names = list(sides)
    warm = {name: [] for name in names}
    for name in names:
        time.sleep(SETTLE_SECONDS)
        warm[name] += sides[name].call(run=max(warmup, 1))["times"]
    slowest = max(statistics.median(values) for values in warm.values())
    steps = max(steps, math.ceil(min_seconds / slowest))
    block = max(1, min(steps, math.ceil(block_seconds / slowest)))
    times = {name: [] for name in names}

    def run_block(name: str) -> bool:
        time.sleep(SETTLE_SECONDS)
        times[name] += sides[name].call(run=min(block, steps - len(times[name])))["times"]
        return len(times[name]) >= steps

    in_turns(names, run_block)
    return times, block


def serve_side(case_name: str, side_name: str, threads: int, tokens: int) -> None:
    """The worker process of one side: build it, take one checked first step, then run steps on command."""
    channel = Channel()
    if side_name.startswith("torch"):
        import torch  # noqa: PLC0415

        torch.manual_seed(0)
        torch.set_num_threads(threads)
    limiter = set_threads(threads)
    case = next(c for c in all_cases(tokens) if c.name == case_name)
    state, data = case.prepare()
    side = case.build(side_name, state, data)
    started = time.perf_counter()
    first = side.step()
    first_seconds = time.perf_counter() - started  # torch.compile compiles here
    from mnn import jit  # noqa: PLC0415 - imported by the case already
    from mnn.backend import MALLOC_RETAINS_FREED_MEMORY  # noqa: PLC0415

    channel.send({"first_loss": side.loss(first) if side.loss else None, "first_step_seconds": first_seconds,
                  "flops": side.flops,
                  "blas": kernel.torch_blas() if side_name.startswith("torch") else kernel.numpy_blas(),
                  "mnn_malloc_settings": MALLOC_RETAINS_FREED_MEMORY, "mnn_jit": jit.enabled()})
    gc.collect()
    while (command := channel.receive()) is not None:
        durations = []
        for _ in range(command["run"]):
            started = time.perf_counter()
            side.step()
            durations.append(time.perf_counter() - started)
        channel.send({"times": durations})
    del limiter


def _relative_iqr(values: list) -> float:
    """Interquartile range over median: how noisy a side's step times were (0.05 is quiet)."""
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return (q3 - q1) / median


def run_case(case, steps: int, warmup: int, threads: int, tokens: int, torch_malloc: str,
             min_seconds: float = 0.0, drop=(), compile_side: bool = True, mnn_blas: str | None = None) -> dict:
    """Start one worker process per side of ``case``, check the first steps, time them; the case's result dict.

    ``drop``: environment variables the workers run without (:func:`benchmarks.kernel.benchmark_environment`);
    ``compile_side``: include the case's ``extra_sides`` (``torch.compile``); ``mnn_blas``: ``MNN_BLAS`` for mnn's.
    """
    names = SIDES + (case.extra_sides if compile_side else ())
    sides = {}
    try:
        for name in names:
            sides[name] = Worker("benchmarks.compare", ["--worker", case.name, name, "--threads", str(threads),
                                                        "--tokens", str(tokens)],
                                 side_environment(name, torch_malloc, drop, mnn_blas))
        first_loss = {name: sides[name].greeting["first_loss"] for name in names if name != "floor"}
        malloc = {name: sides[name].greeting["mnn_malloc_settings"] for name in names}
        blas = {name: sides[name].greeting["blas"] for name in names}
        first_seconds = {name: sides[name].greeting["first_step_seconds"] for name in names}
        compiled = sides["mnn"].greeting["mnn_jit"]
        flops = sides["floor"].greeting["flops"]
        times, block = time_interleaved(sides, steps, max(warmup - 1, 0), min_seconds=min_seconds)
    finally:
        for worker in sides.values():
            worker.close()
    per_unit = {name: 1000.0 * statistics.median(values) / case.units_per_step for name, values in times.items()}
    ratio = {"mnn/torch": per_unit["mnn"] / per_unit["torch"], "mnn/floor": per_unit["mnn"] / per_unit["floor"],
             "torch/floor": per_unit["torch"] / per_unit["floor"]}
    ratio.update({f"mnn/{name}": per_unit["mnn"] / per_unit[name] for name in names[len(SIDES):]})
    return {
        "description": case.description,
        "unit": case.unit,
        "units_per_step": case.units_per_step,
        "ms": per_unit,
        "ratio": ratio,
        "blas": blas,
        "matmul_flops_per_step": flops,  # the case's matrix products (the floor's), the same on every side
        "gflops": {name: flops / (ms * case.units_per_step) / 1e6 for name, ms in per_unit.items()},
        "first_step_seconds": first_seconds,  # for torch_compile: the compilation
        "spread": {name: _relative_iqr(values) for name, values in times.items()},
        "first_loss": first_loss,
        "mnn_malloc_settings": malloc,
        "mnn_jit": compiled,
        "steps": len(times["mnn"]),
        "warmup": warmup,
        "steps_per_block": block,
    }


# -- peak memory, one fresh process per framework per case -----------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0); False if this system cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _replica_pids(side) -> list[int]:
    """The processes of mnn's replicas (``mnn.replica_process``) that ``side`` keeps, if any."""
    return [worker._process.pid for kept in side.keep for worker in getattr(kept, "_workers", {}).values()]


def _private_kb(pid) -> int:
    """Memory only this process holds (``Private_Clean + Private_Dirty`` of ``smaps_rollup``), in kB."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    except OSError:
        pass
    return total


def probe_memory(case_name: str, framework: str, threads: int, steps: int, tokens: int) -> dict:
    """In this (fresh) process: peak resident memory of building ``framework``'s side and running ``steps`` steps.

    Each framework's runtime is imported before the baseline, like numpy:
    PyTorch, or numba when mnn runs its compiled loops (its kernels, compiled
    or loaded from the disk cache on the first step, do count). What the
    import itself took is returned as ``import_mb``.
    """
    before_kb = _status_kb("VmRSS")
    if framework == "torch":
        import torch  # noqa: PLC0415, F401 - imported before the baseline, like numpy

        torch.set_num_threads(threads)
    else:
        from mnn import jit  # noqa: PLC0415

        jit.enabled()  # imports numba if it is installed and not turned off
    import_mb = (_status_kb("VmRSS") - before_kb) / 1024.0 if before_kb is not None else None
    limiter = set_threads(threads)
    case = next(c for c in all_cases(tokens) if c.name == case_name)
    state, data = case.prepare()  # the shared weights and data: before the baseline, on both sides
    gc.collect()
    if _reset_peak():
        method = "VmHWM - VmRSS (clear_refs reset)"
        baseline_kb = _status_kb("VmRSS")
    else:
        method = "ru_maxrss delta"
        baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    side = case.build(framework, state, data)
    side.step()  # mnn's replica processes fork at the end of the first step (mnn.parallel)
    children = {pid: _private_kb(pid) for pid in _replica_pids(side)}  # at the fork: what they already held
    for _ in range(steps - 1):
        side.step()
    peak_kb = _status_kb("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = sum(max(0, _private_kb(pid) - before) for pid, before in children.items())
    del limiter
    return {"peak_mb": (peak_kb - baseline_kb + children_kb) / 1024.0, "import_mb": import_mb, "method": method,
            "replica_processes_mb": children_kb / 1024.0}


def measure_memory(jobs: list[tuple[str, str]], threads: int, steps: int, tokens: int,
                   torch_malloc: str = "default", drop=(), mnn_blas: str | None = None) -> dict:
    """Run :func:`probe_memory` for every ``(case, framework)`` in its own subprocess, two at a time.

    Memory, not time, is measured here, so the probes may overlap.
    """
    def run(job):
        command = [sys.executable, "-m", "benchmarks.compare", "--probe-memory", *job, "--threads", str(threads),
                   "--probe-steps", str(steps), "--tokens", str(tokens)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, check=False,
                              env=environment(side_environment(job[1], torch_malloc, drop, mnn_blas)))
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {job} failed:\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(jobs, pool.map(run, jobs)))


# -- the machine and the report -----------------------------------------------------
def machine_info(threads: int) -> dict:
    import torch  # noqa: PLC0415

    cpu_model = kernel.cpu_model()
    try:
        from importlib.metadata import version  # noqa: PLC0415

        numba_version = version("numba")
    except Exception:  # noqa: BLE001 - not installed: the numpy-only path
        numba_version = None
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "numba": numba_version,
        "MNN_JIT": os.environ.get("MNN_JIT"),
        "threads": threads,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "threading_environment": {k: v for k, v in os.environ.items()
                                  if k.startswith(("OMP_", "GOMP_", "OPENBLAS_", "MKL_", "KMP_", "MALLOC_"))},
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def check_bars(cases: dict) -> dict:
    bars = {}
    for name, limit in BARS.items():
        if name in cases:
            ratio = cases[name]["ratio"]["mnn/torch"]
            bars[f"{name} time mnn/torch <= {limit}"] = {"value": ratio, "pass": ratio <= limit}
    for name in COMPILED_BARS:
        if "mnn/torch_compile" in cases.get(name, {}).get("ratio", {}):
            ratio = cases[name]["ratio"]["mnn/torch_compile"]
            bars[f"{name} time mnn/torch.compile <= 1.0"] = {"value": ratio, "pass": ratio <= 1.0}
    for name in MEMORY_BARS:
        peak = cases.get(name, {}).get("peak_mb")
        if peak:
            ratio = peak["mnn"] / peak["torch"]
            bars[f"{name} peak memory mnn/torch <= 1.0"] = {"value": ratio, "pass": ratio <= 1.0}
    return bars


def format_table(results: dict) -> str:
    machine = results["machine"]
    lines = [f"{machine['cpu_model']}, {machine['threads']} thread(s); mnn: {kernel.describe(machine['blas'])}; "
             f"PyTorch: {kernel.describe(machine['torch_blas'])}"]
    lines.append(f"peak float32 matrix product: {machine['peak_sgemm_gflops']:.0f} GFLOP/s (mnn's BLAS, 2048^3); "
                 "GF/s and MFU count the step's matrix products")
    header = (f"{'case':<24} {'unit':>5} {'mnn ms':>9} {'torch ms':>9} {'floor ms':>9} "
              f"{'mnn/torch':>9} {'mnn/floor':>9} {'torch/floor':>11} {'mnn MB':>7} {'torch MB':>8} "
              f"{'mnn GF/s':>8} {'MFU':>5} {'compiled ms':>11} {'mnn/compiled':>12}")
    lines += [header, "-" * len(header)]
    for name, case in results["cases"].items():
        ms, ratio, peak = case["ms"], case["ratio"], case.get("peak_mb") or {}
        memory = "".join(f" {peak[f]:>{w}.1f}" if f in peak else f" {'-':>{w}}" for f, w in (("mnn", 7), ("torch", 8)))
        compiled = (f" {ms['torch_compile']:>11.3f} {ratio['mnn/torch_compile']:>12.2f}" if "torch_compile" in ms
                    else f" {'-':>11} {'-':>12}")
        lines.append(f"{name:<24} {case['unit']:>5} {ms['mnn']:>9.3f} {ms['torch']:>9.3f} {ms['floor']:>9.3f} "
                     f"{ratio['mnn/torch']:>9.2f} {ratio['mnn/floor']:>9.2f} {ratio['torch/floor']:>11.2f}{memory} "
                     f"{case['gflops']['mnn']:>8.1f} {case['mfu']['mnn']:>5.0%}{compiled}")
    compile_seconds = [f"{name} {case['first_step_seconds']['torch_compile']:.1f} s"
                       for name, case in results["cases"].items() if "torch_compile" in case["first_step_seconds"]]
    if compile_seconds:
        lines.append("torch.compile's first step (compiling; not in the times above): " + ", ".join(compile_seconds))
    noisy = [f"{name} {side} {spread:.0%}" for name, case in results["cases"].items()
             for side, spread in case.get("spread", {}).items() if spread > 0.25]
    if noisy:
        lines.append("noisy (interquartile range / median > 25%): " + ", ".join(noisy))
    for bar, verdict in results.get("bars", {}).items():
        lines.append(f"bar {bar}: {verdict['value']:.2f} {'PASS' if verdict['pass'] else 'FAIL'}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415

    names = list(results["cases"])
    figure, (speed, memory) = pyplot.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    positions = numpy.arange(len(names))
    for offset, (side, colour) in zip((-0.27, 0.0, 0.27), (("mnn", "tab:blue"), ("torch", "tab:orange"),
                                                           ("floor", "tab:gray"))):
        values = [results["cases"][n]["ms"][side] / results["cases"][n]["ms"]["torch"] for n in names]
        speed.bar(positions + offset, values, width=0.27, label=side, color=colour)
    speed.axhline(1.0, color="black", linewidth=0.8)
    speed.set_xticks(positions, [n.replace("_", "\n") for n in names], fontsize=8)
    speed.set_ylabel("time / PyTorch time (lower is faster)")
    threads = results["machine"]["threads"]
    speed.set_title(f"median time per step, relative to PyTorch ({threads} thread{'s' if threads > 1 else ''} each)")
    speed.legend()
    with_memory = [n for n in names if results["cases"][n].get("peak_mb")]
    if with_memory:
        memory_positions = numpy.arange(len(with_memory))
        for offset, (side, colour) in zip((-0.2, 0.2), (("mnn", "tab:blue"), ("torch", "tab:orange"))):
            memory.bar(memory_positions + offset, [results["cases"][n]["peak_mb"][side] for n in with_memory],
                       width=0.4, label=side, color=colour)
        memory.set_xticks(memory_positions, [n.replace("_", "\n") for n in with_memory], fontsize=8)
        memory.set_ylabel("peak resident memory above baseline (MB)")
        memory.set_title("peak memory (fresh process each)")
        memory.legend()
    figure.suptitle(f"mnn vs PyTorch {results['machine']['torch']} on {results['machine']['cpu_model']}, "
                    f"{results['date'][:10]}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only (CI): checks, not figures")
    parser.add_argument("--threads", type=int, default=2, help="threads for numpy's BLAS and for PyTorch")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 60; --quick 3)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help=f"timed seconds per side at least, in more steps (default {MIN_SECONDS:g}; --quick 0)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per side (default 5; --quick 1)")
    parser.add_argument("--cases", nargs="*", default=None, help="run only these cases")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for results.json and results.png")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per generation step (default 63; --quick 8)")
    parser.add_argument("--torch-malloc", choices=["default", "mnn"], default="default",
                        help="PyTorch's processes with glibc's default malloc settings (as PyTorch users run it) "
                             "or with the ones mnn sets when imported")
    parser.add_argument("--keep-blas-env", action="store_true",
                        help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE as set (default: run without them when "
                             "they force a kernel other than the CPU's own)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile sides (their compiling)")
    parser.add_argument("--mnn-blas", choices=["auto", "numpy", "mkl"], default="auto",
                        help="mnn's BLAS (MNN_BLAS): auto takes MKL on an Intel CPU where it is installed, numpy's "
                             "OpenBLAS elsewhere")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-memory", nargs=2, metavar=("CASE", "FRAMEWORK"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tokens = args.tokens or (8 if args.quick else 63)

    if args.worker:
        serve_side(*args.worker, args.threads, tokens)
        return {}
    if args.probe_memory:
        print(json.dumps(probe_memory(*args.probe_memory, args.threads, args.probe_steps, tokens)))
        return {}
    steps = args.steps or (3 if args.quick else 60)
    warmup = args.warmup or (1 if args.quick else 5)
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.0 if args.quick else MIN_SECONDS)
    cases = [c for c in all_cases(tokens) if args.cases is None or c.name in args.cases]
    unknown = set(args.cases or ()) - {c.name for c in cases}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {[c.name for c in all_cases()]}")

    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    drop, blas_environment = kernel.benchmark_environment(keep=args.keep_blas_env)
    if blas_environment["message"]:
        print(blas_environment["message"], file=sys.stderr, flush=True)
    mnn_blas, why = kernel.mnn_library(args.mnn_blas)
    print(f"mnn multiplies with {why}", file=sys.stderr, flush=True)
    peak = kernel.peak_sgemm(args.threads, environment({**dict.fromkeys(drop), "MNN_BLAS": mnn_blas}),
                             *((512, 3) if args.quick else ()))
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": "python -m benchmarks.compare" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
               "quick": args.quick, "machine": machine_info(args.threads), "torch_malloc": args.torch_malloc,
               "cases": {}}
    for case in cases:
        print(f"timing {case.name} ({steps} interleaved steps) ...", file=sys.stderr, flush=True)
        result = run_case(case, steps, warmup, args.threads, tokens, args.torch_malloc, min_seconds, drop,
                          compile_side=not args.no_compile, mnn_blas=mnn_blas)
        results["cases"][case.name] = result
        losses = result["first_loss"]
        if any(abs(losses["mnn"] - loss) > LOSS_RTOL * abs(loss) for loss in losses.values()):
            print(f"WARNING {case.name}: first-step losses differ: {losses}", file=sys.stderr)
    # What the workers multiplied with (the parent's numpy may run with a forced kernel the workers dropped).
    first = next(iter(results["cases"].values()))["blas"]
    pools = {}  # every library mnn's side used in some case (MKL appears once it multiplied)
    for case in results["cases"].values():
        pools.update({pool["library"]: pool for pool in case["blas"]["mnn"] if pool["library"] not in pools})
    results["machine"].update(blas=list(pools.values()), torch_blas=first["torch"], blas_environment=blas_environment,
                              peak_sgemm_gflops=peak, mnn_blas={"library": mnn_blas, "why": why})  # 2048^3 float32 products on numpy's BLAS, the threads above
    for result in results["cases"].values():
        result["mfu"] = {name: rate / peak for name, rate in result["gflops"].items()}
    results["memory_method"] = None
    if not args.no_memory:
        print("peak memory (a fresh process per framework per case) ...", file=sys.stderr, flush=True)
        jobs = [(case.name, framework) for case in cases for framework in FRAMEWORKS]
        probes = measure_memory(jobs, args.threads, 2 if args.quick else 3, tokens, args.torch_malloc, drop,
                                mnn_blas)
        for case in cases:
            results["cases"][case.name]["peak_mb"] = {f: probes[(case.name, f)]["peak_mb"] for f in FRAMEWORKS}
            results["cases"][case.name]["import_mb"] = {f: probes[(case.name, f)]["import_mb"] for f in FRAMEWORKS}
            results["cases"][case.name]["replica_processes_mb"] = probes[(case.name, "mnn")]["replica_processes_mb"]
        results["memory_method"] = (
            f"{probes[jobs[0]]['method']}: peak resident set of a fresh subprocess per framework per case, minus "
            "its resident set after the imports (PyTorch; numba for mnn's compiled loops), weights and data (so: "
            "model, gradients, optimizer state, activations, workspace, compiled kernels), plus the private memory "
            "(smaps_rollup) mnn's replica processes gained after their fork; import_mb is what importing the "
            "framework's runtime took")
    results["bars"] = check_bars(results["cases"])
    results["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "results.png")
    print(format_table(results))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.png'}")
    return results


if __name__ == "__main__":
    main()
