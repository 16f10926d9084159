"""What every training script shares: log lines, the progress bar, the history file and its plot, stop signals."""

from __future__ import annotations

import csv
import json
import math
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from mnn.backend import xp


def progress_bar(total: int, initial: int = 0, description: str = ""):
    """A tqdm bar on stderr when stderr is a terminal; ``None`` otherwise (no bars in CI logs)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=description, leave=False, dynamic_ncols=True)


def log(line: str, bar=None) -> None:
    """Print a log line without tearing the progress bar."""
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


class StepTimer:
    """Milliseconds per step, averaged over the steps since the last read."""

    def __init__(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    def read_ms(self) -> float:
        now = time.perf_counter()
        ms = 1000.0 * (now - self.start) / max(self.steps, 1)
        self.start, self.steps = now, 0
        return ms


class History:
    """Rows of metrics (one dict a row), written as ``history.json`` and ``history.csv`` and plotted."""

    def __init__(self, rows: list[dict] | None = None) -> None:
        self.rows = list(rows or [])

    def add(self, **row) -> None:
        self.rows.append(row)

    def write(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "history.json").write_text(json.dumps(self.rows, indent=1) + "\n")
        columns = sorted({key for row in self.rows for key in row}, key=lambda k: (k != "step", k != "epoch", k))
        with open(folder / "history.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def plot(self, path, series: list[str], title: str) -> Path | None:
        """A PNG of each named series against ``step``; ``None`` without matplotlib."""
        try:
            import matplotlib  # noqa: PLC0415 - optional dependency

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # noqa: PLC0415
        except ImportError:
            return None
        figure, axes = plt.subplots(figsize=(7, 4))
        plotted = False
        for name in series:
            points = [(row["step"], row[name]) for row in self.rows if name in row]
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, label=name, marker="." if len(points) < 30 else None)
                plotted = True
        axes.set_xlabel("step")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if plotted:
            axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return Path(path)


class StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM into a request to stop at the next step boundary.

    Used as a context manager around the training loop: the first signal only
    sets :attr:`signal_name`; the loop checks :attr:`requested` after each
    step, saves a checkpoint and returns. A second Ctrl-C raises
    ``KeyboardInterrupt`` at once (the last checkpoint stays as it was).
    Outside the main thread (where Python cannot install handlers) it does
    nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


def resume_command(model: str, folder) -> str:
    """The command that continues a run saved in ``folder``."""
    return f"mnn train {model} --resume {shlex.quote(str(folder))}"


def grad_norm(named_grads) -> float:
    """The global L2 norm of the gradients (read only), to spot a non-finite one."""
    total = 0.0
    for _, grad in named_grads:
        flat = grad.reshape(-1)
        total += float(xp.vdot(flat, flat))
    return math.sqrt(total)
