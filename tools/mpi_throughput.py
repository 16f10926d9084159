"""Tokens per second of the GPT CPU recipe in one process and in MPI ranks, and Allreduce time against bytes.

    .venv/bin/python tools/mpi_throughput.py                 # everything, printed, and --json FILE if given
    .venv/bin/python tools/mpi_throughput.py --only allreduce
    .venv/bin/mpiexec -n 2 .venv/bin/python tools/mpi_throughput.py --allreduce-worker   # what the driver launches

Each training case is ``mnn train gpt --preset shakespeare-char-cpu`` for
``--iters`` iterations without evaluations in between; its time per step is
the mean of the log lines' ``ms/step`` after the first (warm-up) line, and the
cases run in turns, ``--repeats`` times, so that a load on the machine
touches all of them; the median per case is reported. The Allreduce timings
are medians of in-place buffer ``Allreduce`` calls on float32 arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
BLOCK = 64
# (name, ranks, batch per rank, extra options); the recipe's global batch is 12 windows of 64 characters.
CASES = [
    ("1 process, 2 replicas (both cores)", 1, 12, []),
    ("1 process, 1 replica, 2 BLAS threads", 1, 12, ["--replicas", "1"]),
    ("2 ranks x 1 BLAS thread, 6 each", 2, 6, []),
    ("2 ranks x 1 BLAS thread, 12 each", 2, 12, []),
    ("4 ranks oversubscribed, 3 each", 4, 3, []),
]
# The recipe's GPT (3.2 MB of float32 gradients) and nanoGPT's GPU Shakespeare config (42.7 MB).
MODELS = {"recipe": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
          "shakespeare-char": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}}
# nanoGPT's GPU config (preset shakespeare-char, T 256, dropout 0 here) at a CPU-sized batch of 8 windows.
LARGE_CASES = [
    ("large: 1 process, 2 replicas", 1, 8, []),
    ("large: 2 ranks x 1 BLAS thread, 4 each", 2, 4, []),
]
LARGE_OPTIONS = ["--preset", "shakespeare-char", "--dropout", "0"]
SIZES = [4 << 10, 64 << 10, 256 << 10, 1 << 20, 3_200_000, 4 << 20, 16 << 20, 42_700_000]


def child_env() -> dict:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PYTHONPATH": str(ROOT)}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    return env


BIND_TO = ["--bind-to", "none"]  # a shared machine: let a rank move off a core another job took (see the page)


def launch(ranks: int, command: list, timeout: float) -> str:
    if ranks > 1:
        command = [str(BIN / "mpiexec"), "--oversubscribe", *BIND_TO, "-n", str(ranks), *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env())
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def idle_fraction(seconds: float = 0.5) -> float:
    """The share of the machine's CPU time that was idle over the next ``seconds`` (/proc/stat)."""
    def read():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)
    idle0, total0 = read()
    time.sleep(seconds)
    idle1, total1 = read()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_until_quiet(threshold: float, patience: float) -> float:
    """Wait (up to ``patience`` s) until the CPUs are at least ``threshold`` idle; the idle share found."""
    deadline = time.monotonic() + patience
    idle = idle_fraction()
    while idle < threshold and time.monotonic() < deadline:
        idle = idle_fraction()
    return idle


def train_case(ranks: int, batch: int, extra: list, iters: int, out: Path, preset=None) -> float:
    """Milliseconds per training step (log lines after the first)."""
    command = [sys.executable, "-m", "mnn.cli", "train", "gpt", *(preset or ["--preset", "shakespeare-char-cpu"]),
               "--max-iters", str(iters), "--eval-interval", str(iters), "--eval-iters", "1",
               "--log-interval", str(max(1, iters // 6)), "--batch-size", str(batch), "--out", str(out), *extra]
    if TEXT.is_file():
        command += ["--data", str(TEXT)]
    stdout = launch(ranks, command, timeout=600)
    ms = [float(m) for m in re.findall(r"\| loss [^|]+\| lr [^|]+\| ([0-9.]+) ms/step", stdout)]
    if len(ms) < 2:
        raise RuntimeError(f"no timings in the log:\n{stdout}")
    return statistics.fmean(ms[1:])


def allreduce_worker(repeats: int) -> None:
    """Under mpiexec: median seconds of ``Allreduce(IN_PLACE, float32 buffer)`` per size; rank 0 prints JSON."""
    import numpy  # noqa: PLC0415

    from mnn.distributed import DistributedDataParallel, world  # noqa: PLC0415
    from mnn.models import GPT, GPTConfig  # noqa: PLC0415

    group = world()
    rows = []
    for size in SIZES:
        buffer = numpy.ones(size // 4, dtype=numpy.float32)
        times = []
        for _ in range(repeats + 3):
            group.comm.Barrier()
            started = time.perf_counter()
            group.allreduce_sum(buffer)
            times.append(time.perf_counter() - started)
        seconds = group.comm.allreduce(statistics.median(times[3:]), op=__import__("mpi4py").MPI.MAX)
        rows.append({"bytes": buffer.nbytes, "seconds": seconds})
    buckets = []
    for name, shape in MODELS.items():
        model = GPT(GPTConfig(vocab_size=65, dropout=0.0, bias=False, **shape), seed=0)
        for cap in (1, 4, 25):
            ddp = DistributedDataParallel(model, group, bucket_cap_mb=cap)
            times = []
            for _ in range(max(5, repeats // 5) + 2):
                group.comm.Barrier()
                started = time.perf_counter()
                ddp.reduce_gradients()
                times.append(time.perf_counter() - started)
            seconds = group.comm.allreduce(statistics.median(times[2:]), op=__import__("mpi4py").MPI.MAX)
            buckets.append({"model": name, "bytes": sum(g.nbytes for _, g in model.named_grads()),
                            "bucket_cap_mb": cap, "buckets": len(ddp.buckets), "seconds": seconds})
    if group.is_main:
        print(json.dumps({"points": rows, "buckets": buckets}))


def ring_fit(rows: list, ranks: int) -> dict:
    """Least squares of ``t = 2(p-1)/p * S/B + 2(p-1) a`` over the points: bandwidth B (bytes/s), latency a (s)."""
    xs = [2 * (ranks - 1) / ranks * row["bytes"] for row in rows]
    ys = [row["seconds"] for row in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    return {"bandwidth_bytes_per_s": 1 / slope, "latency_s": intercept / (2 * (ranks - 1))}


# The projection's network: line rate in Gb/s; 90% of it as payload bandwidth; 30 us per message step (Open MPI
# over TCP on Ethernet). Assumptions, not measurements: see docs/scaling.md.
NETWORKS = {"10 GbE": 10, "25 GbE": 25, "100 GbE": 100}
PAYLOAD_SHARE, LATENCY_S = 0.9, 30e-6


def ring_seconds(grad_bytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring Allreduce: ``2(p-1)/p * S/B + 2(p-1) a``."""
    return 2 * (ranks - 1) / ranks * grad_bytes / bandwidth + 2 * (ranks - 1) * latency


def projection(compute_s: float, grad_bytes: float, machines=(1, 2, 4, 8, 16, 32, 64, 100)) -> str:
    """A Markdown table: step time (ms) and scaling efficiency per machine count and network, no overlap."""
    lines = ["| machines | " + " | ".join(f"{net}: ms/step (efficiency)" for net in NETWORKS) + " |",
             "| ---: | " + " | ".join("---:" for _ in NETWORKS) + " |"]
    for n in machines:
        cells = []
        for rate in NETWORKS.values():
            step = compute_s + (ring_seconds(grad_bytes, n, rate * 1e9 / 8 * PAYLOAD_SHARE, LATENCY_S) if n > 1 else 0)
            cells.append(f"{step * 1e3:.1f} ({compute_s / step:.0%})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    import numpy  # noqa: F401, PLC0415 - loads the BLAS threadpoolctl reports
    from threadpoolctl import threadpool_info  # noqa: PLC0415

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    blas = [f"{i['internal_api']} {i.get('version')} {i.get('architecture')}" for i in threadpool_info()
            if i["user_api"] == "blas"]
    return {"cpu": model, "cores": os.cpu_count(), "blas": blas}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["train", "large", "allreduce"])
    parser.add_argument("--large-iters", type=int, default=8, help="iterations of each larger-GPT case")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quiet", type=float, default=0.9,
                        help="before each run, wait until this share of the CPUs is idle (at most --patience s)")
    parser.add_argument("--patience", type=float, default=120)
    parser.add_argument("--bind-to", default="none", help="mpiexec's --bind-to for the ranks (core, none)")
    parser.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--project", nargs=2, type=float, metavar=("STEP_MS", "GRAD_BYTES"),
                        help="print the projection table for one machine's step time and the gradient bytes")
    args = parser.parse_args(argv)
    BIND_TO[1] = args.bind_to
    if args.allreduce_worker:
        allreduce_worker(args.repeats)
        return 0
    if args.project:
        print(projection(args.project[0] / 1e3, args.project[1]))
        return 0
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(results["machine"]))
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"mnn-throughput-{os.getpid()}"
    groups = {"train": (CASES, args.iters, None, BLOCK), "large": (LARGE_CASES, args.large_iters, LARGE_OPTIONS, 256)}
    for group, (cases, iters, preset, block) in groups.items():
        if args.only not in (None, group):
            continue
        times, idle = {name: [] for name, *_ in cases}, {name: [] for name, *_ in cases}
        for _ in range(args.repeats):
            for name, ranks, batch, extra in cases:
                folder = out / name.replace(" ", "_").replace(":", "")
                idle[name].append(round(wait_until_quiet(args.quiet, args.patience), 2))
                times[name].append(train_case(ranks, batch, extra, iters, folder, preset))
        base = None
        results[group] = []
        for name, ranks, batch, _ in cases:
            ms = statistics.median(times[name])
            tokens = ranks * batch * block / (ms / 1000)
            base = base or tokens
            row = {"case": name, "ms_per_step": round(ms, 2), "tokens_per_s": round(tokens),
                   "vs_first": round(tokens / base, 3), "runs_ms": [round(t, 1) for t in times[name]], "idle_before": idle[name]}
            results[group].append(row)
            print(json.dumps(row))
    if args.only in (None, "allreduce"):
        results["allreduce"] = {}
        for ranks in (2, 4):
            stdout = launch(ranks, [sys.executable, __file__, "--allreduce-worker", "--repeats", "50"], 600)
            measured = json.loads(stdout.strip().splitlines()[-1])
            rows = measured["points"]
            fit = ring_fit([row for row in rows if row["bytes"] <= 4 << 20], ranks)  # in cache: see the page
            results["allreduce"][str(ranks)] = {**measured, "fit_up_to_4MiB": fit}
            print(json.dumps({"ranks": ranks, "fit_up_to_4MiB": fit}))
            for row in rows:
                print(f"  {row['bytes']:>10,} bytes  {row['seconds'] * 1e3:8.3f} ms")
            for row in measured["buckets"]:
                print(f"  DDP {row['model']}: {row['bytes']:,} bytes in {row['buckets']} buckets of <= "
                      f"{row['bucket_cap_mb']} MB: {row['seconds'] * 1e3:.3f} ms")
    shutil.rmtree(out, ignore_errors=True)  # the runs' checkpoints (130 MB each for the larger GPT)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
