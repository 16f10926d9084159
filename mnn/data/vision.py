"""Fashion-MNIST and MNIST: find the four IDX files (or download them), load and validate them.

:func:`load_vision_dataset` looks in this order and uses the first folder
that holds all four standard files, each either gzip-compressed (``.gz``) or
raw:

1. ``data_dir``, when given (then nothing else is tried: a missing file is an error);
2. for Fashion-MNIST, Debian's ``/usr/share/datasets/fashion-mnist``
   (``apt install dataset-fashion-mnist``);
3. the cache folder, ``<cache>/<name>`` (see :func:`mnn.data.download.cache_dir`);
4. with ``download=True``, the upstream mirror, into the cache folder,
   each file checked against its published sha256.
"""

from __future__ import annotations

from pathlib import Path

import numpy

from mnn.data.download import _network_reason, cache_dir, download_verified
from mnn.data.idx import read_idx
from mnn.errors import DataError

#: split -> (images file, labels file), without the ``.gz`` suffix.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Debian package dataset-fashion-mnist installs the four .gz files here.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Upstream mirrors and the sha256 of each published ``.gz`` file.
#: Debian's copies hold the same images but are re-packed gzip files (header
#: without the file name, new mtime), so their digests differ from these.
SOURCES = {
    "fashion-mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "sha256": {
            "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
            "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
            "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
            "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
        },
    },
    "mnist": {
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "sha256": {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    },
}

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


def _stems() -> list[str]:
    return [stem for pair in SPLIT_FILES.values() for stem in pair]


def _find(folder: Path, stem: str) -> Path | None:
    """``folder/stem.gz`` if it exists, else the raw ``folder/stem``, else None."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _files_in(folder: Path) -> dict[str, Path] | None:
    """stem -> path for the four files, or None when any is missing."""
    found = {stem: _find(folder, stem) for stem in _stems()}
    return None if None in found.values() else found


def _download_missing(name: str, folder: Path) -> dict[str, Path]:
    source = SOURCES[name]
    for stem in _stems():
        if _find(folder, stem) is None:
            file_name = f"{stem}.gz"
            url, digest = source["url"] + file_name, source["sha256"][file_name]
            try:
                download_verified(url, folder / file_name, digest)
            except DataError as error:
                reason = _network_reason(error)
                if reason is None:
                    raise
                files = ", ".join(f"{each}.gz" for each in _stems())
                raise DataError(f"could not download {url} ({reason}): without network, place the {name} files "
                                f"{files} into {folder} or pass --data-dir DIR (data_dir= in Python), a folder "
                                "holding them") from error
    return _files_in(folder)


def _locate(name: str, data_dir, download_allowed: bool) -> dict[str, Path]:
    if data_dir is not None:
        folder = Path(data_dir)
        found = {stem: _find(folder, stem) for stem in _stems()}
        missing = [stem for stem, path in found.items() if path is None]
        if missing:
            raise DataError(
                f"{folder}: missing {name} file(s) {', '.join(missing)} (each may end in .gz)"
            )
        return found
    folders = [DEBIAN_FASHION_MNIST_DIR] if name == "fashion-mnist" else []
    folders.append(cache_dir() / name)
    for folder in folders:
        found = _files_in(folder)
        if found is not None:
            return found
    if not download_allowed:
        raise DataError(
            f"{name} not found in {', '.join(map(str, folders))} and download=False; "
            "pass data_dir= a folder holding the four IDX files"
        )
    return _download_missing(name, folders[-1])


def _load_split(images_path: Path, labels_path: Path) -> tuple[numpy.ndarray, numpy.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != numpy.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{images_path}: expected uint8 images of shape (N, 28, 28), "
            f"got {images.dtype.name} {images.shape}"
        )
    if labels.dtype != numpy.uint8 or labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected uint8 labels of shape (N,), "
            f"got {labels.dtype.name} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if labels.max() >= NUM_CLASSES:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    return images, labels.astype(numpy.int64)


def load_vision_dataset(name: str, data_dir=None, download: bool = True) -> dict:
    """Load Fashion-MNIST or MNIST, train and test.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        data_dir: a folder with the four IDX files; when given, the only place looked at.
        download: whether to fetch missing files from the upstream mirror into the cache.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}`` with images
        uint8 ``(N, 28, 28)`` (0 = background) and labels int64 ``(N,)`` in 0..9.
        Train has N = 60000 and test N = 10000 for both real datasets.

    Raises:
        DataError: unknown name, files missing, broken, or inconsistent
            (counts differ, labels outside 0..9, images not 28x28);
            the message names the file.
    """
    if name not in SOURCES:
        raise DataError(f"unknown vision dataset {name!r}: expected one of {sorted(SOURCES)}")
    files = _locate(name, data_dir, download)
    return {
        split: _load_split(files[images_stem], files[labels_stem])
        for split, (images_stem, labels_stem) in SPLIT_FILES.items()
    }
