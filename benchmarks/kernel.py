"""Which BLAS kernel each side multiplies with, and the CPU's own: every speed figure names both.

numpy ships OpenBLAS, which picks a kernel for the CPU it finds (``SkylakeX``
on an AVX-512 Xeon or EPYC); ``OPENBLAS_CORETYPE`` forces one instead. Some
machines here set ``OPENBLAS_CORETYPE=Haswell`` and ``OPENBLAS_L2_SIZE=512``
(a guard for older OpenBLAS builds on AMD CPUs), which halves numpy's
matrix-product rate there (AVX2 instead of AVX-512) while PyTorch's MKL is
untouched. A user's machine has no such variables, so the benchmarks measure
with the CPU's own kernel: :func:`benchmark_environment` asks OpenBLAS, in a
subprocess without those variables, which kernel it would pick, and when that
differs from the one forced, the benchmark's worker processes run without
them (and say so). ``--keep-blas-env`` keeps the environment as set. Tests
and CI never change it.

PyTorch's side is named from ``torch.__config__.show()``: its BLAS (MKL on
x86 wheels), oneDNN's version and the CPU capability its kernels dispatch to.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from mnn.throughput import cpu_model  # noqa: F401 - re-exported: the CPU's name beside each figure

FORCING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # the variables that override OpenBLAS's own choice


def numpy_blas() -> list[dict]:
    """numpy's BLAS as threadpoolctl sees it in this process (library, version, kernel, threads), and MKL's
    where mnn multiplies with it (:mod:`mnn.blas`)."""
    import numpy  # noqa: F401, PLC0415 - loads the BLAS threadpoolctl inspects
    from threadpoolctl import threadpool_info  # noqa: PLC0415

    from mnn import blas  # noqa: PLC0415

    pools = [{"library": pool.get("internal_api"), "version": pool.get("version"),
              "kernel": pool.get("architecture"), "threads": pool.get("num_threads"),
              "file": Path(pool.get("filepath", "")).name}
             for pool in threadpool_info() if pool.get("user_api") == "blas" and pool.get("internal_api") != "mkl"]
    mkl = blas.mkl_version() if blas.library() == "mkl" else None
    return pools + ([{**mkl, "used_for": "mnn's products on one thread (replicas)"}] if mkl else [])


def cpu_vendor() -> str | None:
    """``GenuineIntel``, ``AuthenticAMD``, ... from ``/proc/cpuinfo`` (None where there is none)."""
    try:
        found = re.search(r"^vendor_id\s*:\s*(\S+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return found.group(1) if found else None


def mnn_library(choice: str = "auto", vendor: str | None = None, mkl_installed: bool | None = None) -> tuple[str, str]:
    """The BLAS mnn's side multiplies with, and why: ``("mkl" | "numpy", reason)``.

    ``auto`` takes the CPU maker's own kernel: Intel's MKL on an Intel CPU
    where the ``mkl`` package is installed (the kernel PyTorch computes with
    too), numpy's OpenBLAS on its own kernel everywhere else (AMD's EPYC
    included, where OpenBLAS's SkylakeX kernel is the faster).
    """
    from mnn import blas  # noqa: PLC0415

    vendor = cpu_vendor() if vendor is None else vendor
    mkl_installed = blas.mkl_path() is not None if mkl_installed is None else mkl_installed
    if choice == "numpy":
        return "numpy", "numpy's OpenBLAS (--mnn-blas numpy)"
    if choice == "mkl":
        if not mkl_installed:
            raise SystemExit("--mnn-blas mkl: MKL is not installed (pip install 'mnn[mkl]')")
        return "mkl", "MKL (--mnn-blas mkl)"
    if choice != "auto":
        raise ValueError(f"mnn_library: choice must be 'auto', 'numpy' or 'mkl', got {choice!r}")
    if vendor == "GenuineIntel" and mkl_installed:
        return "mkl", "MKL on an Intel CPU (--mnn-blas auto; --mnn-blas numpy for numpy's OpenBLAS)"
    why = "MKL is not installed" if vendor == "GenuineIntel" else f"the CPU is {vendor or 'unknown'}, not Intel"
    return "numpy", f"numpy's OpenBLAS ({why}; --mnn-blas auto)"


def torch_blas() -> dict:
    """PyTorch's BLAS, oneDNN and CPU capability, from ``torch.__config__.show()``."""
    import torch  # noqa: PLC0415

    shown = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", shown)
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", shown)
    onednn = re.search(r"MKL-DNN v([\w.]+)", shown)
    return {"library": blas.group(1) if blas else None, "version": mkl.group(1) if mkl else None,
            "kernel": torch.backends.cpu.get_cpu_capability(), "onednn": onednn.group(1) if onednn else None,
            "threads": torch.get_num_threads()}


def describe(blas: list[dict] | dict) -> str:
    """One line for a table: ``openblas 0.3.31 SkylakeX`` or ``mkl 2024.2 AVX512``."""
    pools = blas if isinstance(blas, list) else [blas]
    return ", ".join(f"{p.get('library')} {p.get('version') or ''} {p.get('kernel')}".replace("  ", " ")
                     for p in pools) or "none found"


def kernel_under(environment: dict) -> str | None:
    """The kernel numpy's OpenBLAS picks in a fresh process with exactly ``environment``."""
    probe = ("import json, numpy; from threadpoolctl import threadpool_info; "
             "print(json.dumps([p.get('architecture') for p in threadpool_info() if p.get('user_api') == 'blas']))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=environment,
                          check=False, timeout=120)
    kernels = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else []
    return kernels[0] if kernels else None


def benchmark_environment(keep: bool = False, environ: dict | None = None) -> tuple[list[str], dict]:
    """Which variables the benchmark's workers drop, and the record of why.

    Returns ``(drop, record)``: ``drop`` names the :data:`FORCING` variables
    to remove from the workers' environment (empty when none is set, when
    ``keep`` is true, or when OpenBLAS picks the same kernel without them);
    ``record`` holds the kernel as set, the CPU's own, what was dropped and a
    ``message`` for the user (``None`` when nothing is forced).
    """
    environ = dict(os.environ if environ is None else environ)
    forced = {name: environ[name] for name in FORCING if name in environ}
    if not forced:
        return [], {"forced": {}, "as_set": None, "own": None, "dropped": [], "message": None}
    as_set = kernel_under(environ)
    own = kernel_under({k: v for k, v in environ.items() if k not in FORCING})
    setting = " ".join(f"{k}={v}" for k, v in forced.items())
    drop = [] if keep or own is None or own == as_set else list(forced)
    if drop:
        message = (f"{setting} forces OpenBLAS's {as_set} kernel; this CPU's own is {own}: the benchmark's "
                   f"processes run without {' and '.join(drop)} (--keep-blas-env keeps them)")
    elif own == as_set:
        message = f"{setting} is set; OpenBLAS picks {own} with or without it"
    else:
        message = f"{setting} kept as set (--keep-blas-env): numpy multiplies with {as_set}, this CPU's own is {own}"
    return drop, {"forced": forced, "as_set": as_set, "own": own, "dropped": drop, "message": message}


def peak_sgemm(threads: int, environment: dict, size: int = 2048, repeats: int = 7) -> float:
    """The machine's float32 matrix-product rate in GFLOP/s: the median of ``repeats`` ``size``-cubed products.

    :func:`mnn.throughput.measure_sgemm` run in a fresh process with
    ``environment`` (the workers'), numpy's BLAS on ``threads`` threads: the
    peak a step's model FLOPs are divided by for MFU.
    """
    probe = (f"import json; from threadpoolctl import threadpool_limits; from mnn.throughput import measure_sgemm; "
             f"limit = threadpool_limits({threads}); print(json.dumps(measure_sgemm({size}, {repeats})))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=environment,
                          check=True, timeout=300)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["median_gflops"])
