"""What a training run shows and records: log lines, the progress bar, step timers, the history file and its plot."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from mnn.distributed import is_worker



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
    """Print a log line without tearing the progress bar (with several ranks, rank 0 alone prints)."""
    if is_worker():
        return
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
        """Append a row; a row for the last row's step joins it (one row per step: a log line and an evaluation)."""
        if self.rows and "step" in row and self.rows[-1].get("step") == row["step"]:
            self.rows[-1].update(row)
        else:
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
