"""Small learnable stand-ins for MNIST that the tests write as real IDX files."""

from pathlib import Path

import numpy as np

from mnn.data import write_idx


def write_fake_mnist(folder: Path, train: int = 600, test: int = 200, seed: int = 0, gzip: bool = False) -> None:
    """MNIST's four IDX files with 10 separable classes: each class lights its own band of image rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gzip else ""
    for prefix, count in [("train", train), ("t10k", test)]:
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 60, (count, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label:2 * label + 3, :] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gzip=gzip)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
