"""Each framework in a Python process of its own, run in turns: the parent says go, one side works, reports.

Two frameworks in one process disturb each other on a 2-core machine: after
each product OpenBLAS keeps its worker threads spinning (~0.1 s), PyTorch's
OpenMP pool spins too, and each takes the cores the other one needs (measured
here: PyTorch's GPT step went from ~40 ms alone to ~118 ms beside mnn). And
process-wide settings would leak from one side to the other: mnn, when
imported, raises glibc's malloc thresholds (:func:`mnn.backend.retain_freed_memory`),
which speeds PyTorch up too. So :mod:`benchmarks.compare` and
:mod:`benchmarks.recipe` start one worker process per side and drive them
over pipes, one block of work at a time, in the order A B B A, so that a
change of machine load (the machines are shared) hits every side alike. Each
side times its own blocks; the parent adds them up.

The PyTorch side runs with ``MNN_RETAIN_FREED_MEMORY=0`` (as a PyTorch user
runs it: it imports mnn only for the shared weights and data) unless
``torch_malloc="mnn"``.

Protocol: one line of JSON per message. The worker first writes a greeting,
then answers each command line; anything the side itself prints goes to its
stderr, which the parent keeps in a file and shows if the worker fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def side_environment(framework: str, torch_malloc: str = "default", drop=(), mnn_blas: str | None = None) -> dict:
    """Environment overrides for a worker of ``framework``; ``None`` removes a variable (``drop``: see
    :func:`benchmarks.kernel.benchmark_environment`; ``mnn_blas``: ``MNN_BLAS`` for mnn's side, see
    :func:`benchmarks.kernel.mnn_library`)."""
    if torch_malloc not in ("default", "mnn"):
        raise ValueError(f"torch_malloc must be 'default' or 'mnn', got {torch_malloc!r}")
    overrides = dict.fromkeys(drop)
    if framework == "torch" and torch_malloc == "default":
        overrides["MNN_RETAIN_FREED_MEMORY"] = "0"
    if framework in ("mnn", "floor") and mnn_blas is not None:  # the floor multiplies as mnn does
        overrides["MNN_BLAS"] = mnn_blas
    return overrides


def environment(overrides: dict | None) -> dict:
    """This process's environment with ``overrides`` applied (a ``None`` value removes the variable)."""
    return {k: v for k, v in {**os.environ, **(overrides or {})}.items() if v is not None}


class Worker:
    """A side of a benchmark in its own process: ``python -m <module> <args>``, driven by :meth:`call`."""

    def __init__(self, module: str, args: list[str], env: dict | None = None) -> None:
        self.name = f"{module} {' '.join(args)}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        env=environment(env))
        self.greeting = self._receive()

    def _receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.seek(0)
            tail = "".join(self.log.readlines()[-30:])
            raise RuntimeError(f"worker {self.name!r} exited with code {self.process.returncode}:\n{tail}")
        return json.loads(line)

    def call(self, **command) -> dict:
        """Send one command, wait for the side to finish it, return its reply."""
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self.log.close()


class Channel:
    """The worker's end: :meth:`send` a reply on the real stdout, :meth:`receive` the next command."""

    def __init__(self) -> None:
        self.out = sys.stdout
        sys.stdout = sys.stderr  # what the side prints must not mix with the replies

    def send(self, message: dict) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def receive(self) -> dict | None:
        line = sys.stdin.readline()
        return json.loads(line) if line.strip() else None


def in_turns(names: list[str], block) -> None:
    """Call ``block(name)`` for each side in rounds, A B then B A, until every side's call has returned True."""
    finished, round_ = set(), 0
    while len(finished) < len(names):
        for name in names if round_ % 2 == 0 else names[::-1]:
            if name not in finished and block(name):
                finished.add(name)
        round_ += 1
