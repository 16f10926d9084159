"""Datasets for mnn: IDX files, Fashion-MNIST/MNIST, mini-batches, and character-level text."""

from mnn.data.batches import minibatches
from mnn.data.download import cache_dir, download_verified, sha256_of
from mnn.data.idx import read_idx, write_idx
from mnn.data.text import (
    CharTokenizer,
    load_text,
    random_windows,
    split_train_val,
    tiny_shakespeare_path,
)
from mnn.data.vision import FASHION_MNIST_CLASSES, load_vision_dataset

__all__ = [
    "CharTokenizer",
    "FASHION_MNIST_CLASSES",
    "cache_dir",
    "download_verified",
    "load_text",
    "load_vision_dataset",
    "minibatches",
    "random_windows",
    "read_idx",
    "sha256_of",
    "split_train_val",
    "tiny_shakespeare_path",
    "write_idx",
]
