"""Tests of mnn.data: IDX files, Fashion-MNIST/MNIST loading and download, mini-batches, text."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from mnn.data import (
    CharTokenizer,
    cache_dir,
    load_text,
    load_vision_dataset,
    minibatches,
    random_windows,
    read_idx,
    split_train_val,
    tiny_shakespeare_path,
    write_idx,
)
from mnn.data import download as download_module
from mnn.data import text as text_module
from mnn.data import vision
from mnn.errors import DataError

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare.txt"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
STEMS = [stem for pair in vision.SPLIT_FILES.values() for stem in pair]


def raises_data_error(match: str, path=None):
    """Context: a DataError (exactly, not a wrapped bare error) whose message matches."""

    class _Check:
        def __enter__(self):
            self.context = pytest.raises(DataError, match=match)
            self.info = self.context.__enter__()
            return self.info

        def __exit__(self, *exc):
            result = self.context.__exit__(*exc)
            assert type(self.info.value) is DataError
            if path is not None:
                assert str(path) in str(self.info.value), str(self.info.value)
            return result

    return _Check()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder, and an opener that fails if anything tries the network."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MNN_CACHE", str(folder))

    def no_network(url, timeout=None):
        raise AssertionError(f"unexpected network access to {url}")

    monkeypatch.setattr(download_module, "urlopen", no_network)
    return folder


def serve(monkeypatch, files: dict[str, bytes], requested: list):
    """Replace the URL opener: ``files`` maps a URL's last part to the bytes it returns."""

    def opener(url, timeout=None):
        requested.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.URLError("no route to host (test)")
        return io.BytesIO(files[name])

    monkeypatch.setattr(download_module, "urlopen", opener)


# --------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2)])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, dtype, shape, compress):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        array = (rng.standard_normal(shape) * 1e3).astype(dtype)
    path = write_idx(tmp_path / "a.idx", array, gzip=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_idx_header_bytes_are_the_format(tmp_path):
    path = write_idx(tmp_path / "x", np.arange(6, dtype=np.int16).reshape(2, 3))
    assert path.read_bytes() == bytes.fromhex("00000b02 00000002 00000003 0000 0001 0002 0003 0004 0005")


def test_idx_gzip_detected_by_magic_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_named_raw = write_idx(tmp_path / "raw.gz", array, gzip=False)
    raw_named_gz = write_idx(tmp_path / "compressed.idx", array, gzip=True)
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)


def test_idx_special_floats_survive(tmp_path):
    array = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], dtype=np.float32)
    back = read_idx(write_idx(tmp_path / "f", array, gzip=True))
    assert back.tobytes() == array.tobytes()


def test_write_idx_rejects_dtypes_without_code(tmp_path):
    with raises_data_error("int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    with raises_data_error("shape"):
        write_idx(tmp_path / "x", np.zeros((2, 0), dtype=np.uint8))


def header(code=0x08, dims=(2, 3)) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


BROKEN = {
    "empty": (b"", "empty file"),
    "bad magic": (b"PK\x03\x04" + bytes(6), "bad magic number 50 4b 03 04"),
    "bad dtype code": (header(code=0x0A) + bytes(6), "bad dtype code 0x0A"),
    "ndim zero": (bytes([0, 0, 8, 0]), "ndim is 0"),
    "magic cut": (b"\x00\x00\x08", "truncated header: 3 bytes"),
    "dims cut": (header(dims=(2, 3, 4))[:10], "truncated header: 3 dimensions need 12 bytes, got 6"),
    "zero dim": (header(dims=(2, 0)), "bad dimension 1 of size 0"),
    "negative dim": (header(dims=(2**32 - 1, 1)) + bytes(1), "bad dimension 0"),
    "truncated payload": (header() + bytes(5), r"truncated payload: shape \(2, 3\) of uint8 needs 6 bytes, got 5"),
    "trailing bytes": (header() + bytes(7), "trailing bytes after the 6-byte payload"),
    "int32 payload cut": (header(code=0x0C) + bytes(23), "needs 24 bytes, got 23"),
    # A header that claims 2^93 bytes must fail fast, without trying to allocate them.
    "huge claim": (header(dims=(2**31 - 1,) * 3) + bytes(100), "truncated payload"),
}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_idx_broken_files_raise_data_error(tmp_path, case, compress):
    content, message = BROKEN[case]
    path = tmp_path / "broken-idx"
    path.write_bytes(gzip.compress(content) if compress else content)
    with raises_data_error(message, path):
        read_idx(path)


def test_idx_corrupt_and_truncated_gzip(tmp_path):
    good = write_idx(tmp_path / "good", np.arange(4000, dtype=np.int32) % 251, gzip=True).read_bytes()
    cases = {
        "flipped": good[:20] + bytes(b ^ 0xFF for b in good[20:40]) + good[40:],
        "cut": good[: len(good) // 2],
        "crc": good[:-8] + bytes(8),
        "header only": good[:2],
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.gz"
        path.write_bytes(content)
        with raises_data_error("corrupted gzip stream", path):
            read_idx(path)


def test_idx_missing_file_and_directory(tmp_path):
    with raises_data_error("cannot read the file", tmp_path / "nope"):
        read_idx(tmp_path / "nope")
    with raises_data_error("cannot read the file", tmp_path):
        read_idx(tmp_path)


# --------------------------------------------------------------- vision datasets
def fake_dataset(folder: Path, n_train=60, n_test=20, compress=True, seed=0):
    """Write a small MNIST-shaped dataset; return the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images_stem, labels_stem = vision.SPLIT_FILES[split]
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{images_stem}{suffix}", images, gzip=compress)
        write_idx(folder / f"{labels_stem}{suffix}", labels, gzip=compress)
        arrays[split] = (images, labels)
    return arrays


def assert_same_dataset(loaded, expected):
    assert set(loaded) == {"train", "test"}
    for split, (images, labels) in expected.items():
        got_images, got_labels = loaded[split]
        assert got_images.dtype == np.uint8 and got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)


@pytest.fixture(scope="module")
def fashion():
    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{DEBIAN_DIR} absent: install the Debian package dataset-fashion-mnist")
    return load_vision_dataset("fashion-mnist", data_dir=DEBIAN_DIR, download=False)


def test_real_fashion_mnist(fashion):
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = fashion[split]
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)
        assert images.min() == 0 and images.max() == 255
    # The first training example of Fashion-MNIST is an ankle boot (class 9).
    assert fashion["train"][1][0] == 9
    assert vision.FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_fashion_mnist_default_search_finds_debian_folder(fashion, cache):
    loaded = load_vision_dataset("fashion-mnist")  # no data_dir; the network would raise
    for split in ("train", "test"):
        np.testing.assert_array_equal(loaded[split][0], fashion[split][0])
        np.testing.assert_array_equal(loaded[split][1], fashion[split][1])
    assert not cache.exists()


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_from_data_dir(tmp_path, cache, compress):
    expected = fake_dataset(tmp_path / "mnist", compress=compress)
    assert_same_dataset(load_vision_dataset("mnist", data_dir=tmp_path / "mnist"), expected)


def test_mnist_from_cache_folder(cache):
    expected = fake_dataset(cache / "mnist", compress=False)
    assert_same_dataset(load_vision_dataset("mnist", download=False), expected)


def test_explicit_data_dir_missing_file_is_named(tmp_path, cache):
    fake_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with raises_data_error("missing mnist file.*t10k-labels-idx1-ubyte", tmp_path):
        load_vision_dataset("mnist", data_dir=tmp_path)


def test_nothing_found_without_download(cache):
    with raises_data_error("download=False"):
        load_vision_dataset("mnist", download=False)


def test_unknown_dataset_name():
    with raises_data_error("unknown vision dataset 'cifar10'"):
        load_vision_dataset("cifar10")


def rewrite(folder: Path, stem: str, array):
    (folder / f"{stem}.gz").unlink()
    write_idx(folder / f"{stem}.gz", array, gzip=True)


def test_validation_errors_name_the_file(tmp_path, cache):
    cases = [
        ("train-labels-idx1-ubyte", np.zeros(59, np.uint8), "60 images but .* 59 labels"),
        ("train-labels-idx1-ubyte", np.full(60, 10, np.uint8), r"label 10 outside 0..9"),
        ("train-labels-idx1-ubyte", np.zeros(60, np.int32), "expected uint8 labels"),
        ("train-labels-idx1-ubyte", np.zeros((60, 1), np.uint8), "expected uint8 labels"),
        ("t10k-images-idx3-ubyte", np.zeros((20, 27, 28), np.uint8), r"\(N, 28, 28\)"),
        ("t10k-images-idx3-ubyte", np.zeros((20, 784), np.uint8), r"\(N, 28, 28\)"),
        ("t10k-images-idx3-ubyte", np.zeros((20, 28, 28), np.float32), r"\(N, 28, 28\)"),
    ]
    for index, (stem, array, message) in enumerate(cases):
        folder = tmp_path / str(index)
        fake_dataset(folder)
        rewrite(folder, stem, array)
        with raises_data_error(message, folder / f"{stem}.gz"):
            load_vision_dataset("mnist", data_dir=folder)


def test_broken_idx_in_data_folder(tmp_path, cache):
    fake_dataset(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with raises_data_error("corrupted gzip stream", path):
        load_vision_dataset("mnist", data_dir=tmp_path)


def test_published_checksums_are_complete():
    for name, source in vision.SOURCES.items():
        assert sorted(source["sha256"]) == sorted(f"{stem}.gz" for stem in STEMS), name
        for digest in source["sha256"].values():
            assert len(digest) == 64 and int(digest, 16) >= 0
    assert vision.SOURCES["fashion-mnist"]["url"].startswith("http://fashion-mnist.s3-website")
    assert vision.SOURCES["mnist"]["url"] == "https://ossci-datasets.s3.amazonaws.com/mnist/"


def fake_mirror(tmp_path, monkeypatch, name="mnist"):
    """Four fake .gz files as served bytes, with the expected digests patched to theirs."""
    expected = fake_dataset(tmp_path / "served")
    served = {}
    for stem in STEMS:
        data = (tmp_path / "served" / f"{stem}.gz").read_bytes()
        served[f"{stem}.gz"] = data
        monkeypatch.setitem(vision.SOURCES[name]["sha256"], f"{stem}.gz", hashlib.sha256(data).hexdigest())
    return expected, served


def test_download_verified_into_cache(tmp_path, cache, monkeypatch):
    expected, served = fake_mirror(tmp_path, monkeypatch)
    requested = []
    serve(monkeypatch, served, requested)
    assert_same_dataset(load_vision_dataset("mnist"), expected)
    assert sorted(requested) == sorted(vision.SOURCES["mnist"]["url"] + f for f in served)
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(served)
    # Second time: from the cache, no network.
    requested.clear()
    assert_same_dataset(load_vision_dataset("mnist"), expected)
    assert requested == []


def test_download_only_missing_files(tmp_path, cache, monkeypatch):
    expected, served = fake_mirror(tmp_path, monkeypatch)
    (cache / "mnist").mkdir(parents=True)
    for stem in STEMS[:3]:
        shutil.copy(tmp_path / "served" / f"{stem}.gz", cache / "mnist")
    requested = []
    serve(monkeypatch, served, requested)
    assert_same_dataset(load_vision_dataset("mnist"), expected)
    assert [url.rsplit("/", 1)[-1] for url in requested] == [f"{STEMS[3]}.gz"]


def test_download_checksum_mismatch_keeps_nothing(tmp_path, cache, monkeypatch):
    _, served = fake_mirror(tmp_path, monkeypatch)
    bad = "t10k-images-idx3-ubyte.gz"
    served[bad] = served[bad][:-1] + bytes([served[bad][-1] ^ 1])
    serve(monkeypatch, served, [])
    with raises_data_error(f"{bad} failed its checksum"):
        load_vision_dataset("mnist")
    left = sorted(p.name for p in (cache / "mnist").iterdir())
    assert bad not in left and not [name for name in left if name.endswith(".part")]
    # Only the files that passed their checksum are kept.
    assert left == sorted(["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"])


def test_download_all_bad_leaves_cache_empty(tmp_path, cache, monkeypatch):
    serve(monkeypatch, {f"{stem}.gz": b"not the file" for stem in STEMS}, [])
    with raises_data_error("failed its checksum"):
        load_vision_dataset("mnist")
    assert list((cache / "mnist").iterdir()) == []


def test_download_network_failure(cache, monkeypatch):
    serve(monkeypatch, {}, [])
    with raises_data_error("could not download https://ossci-datasets.s3.amazonaws.com/mnist/"):
        load_vision_dataset("mnist")
    assert list((cache / "mnist").iterdir()) == []


def test_fashion_download_uses_zalando_mirror_and_upstream_digests(cache, monkeypatch):
    """Debian's .gz files are re-packed (no file name in the gzip header), so their
    bytes do not carry the upstream digests: served as a download, they are refused."""
    if not DEBIAN_DIR.is_dir():
        pytest.skip(f"{DEBIAN_DIR} absent")
    monkeypatch.setattr(vision, "DEBIAN_FASHION_MNIST_DIR", cache / "no-debian")
    requested = []
    serve(monkeypatch, {p.name: p.read_bytes() for p in DEBIAN_DIR.glob("*.gz")}, requested)
    with raises_data_error("failed its checksum"):
        load_vision_dataset("fashion-mnist")
    assert requested == [vision.SOURCES["fashion-mnist"]["url"] + "train-images-idx3-ubyte.gz"]
    assert list((cache / "fashion-mnist").iterdir()) == []


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MNN_CACHE")
    assert cache_dir() == tmp_path / "b" / "mnn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "mnn"


# ------------------------------------------------------------------- minibatches
def test_minibatches_cover_each_index_once_per_epoch():
    x = np.arange(103)
    y = x * 10
    batches = list(minibatches(x, y, 10, rng=0))
    assert [len(bx) for bx, _ in batches] == [10] * 10 + [3]
    seen = np.concatenate([bx for bx, _ in batches])
    np.testing.assert_array_equal(np.sort(seen), x)
    assert not np.array_equal(seen, x)  # actually shuffled
    for bx, by in batches:
        np.testing.assert_array_equal(by, bx * 10)  # x and y stay paired


def test_minibatches_deterministic_by_seed():
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    y = np.arange(50)
    first = [b for _, b in minibatches(x, y, 8, rng=123)]
    again = [b for _, b in minibatches(x, y, 8, rng=np.random.default_rng(123))]
    other = [b for _, b in minibatches(x, y, 8, rng=124)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    # One generator over two epochs gives two different orders.
    rng = np.random.default_rng(5)
    epoch1 = np.concatenate([b for _, b in minibatches(x, y, 8, rng=rng)])
    epoch2 = np.concatenate([b for _, b in minibatches(x, y, 8, rng=rng)])
    assert not np.array_equal(epoch1, epoch2)


def test_minibatches_drop_last_and_no_shuffle():
    x = np.arange(23)
    batches = list(minibatches(x, x, 5, drop_last=True, rng=1))
    assert [len(b) for b, _ in batches] == [5, 5, 5, 5]
    assert len(np.unique(np.concatenate([b for b, _ in batches]))) == 20
    ordered = list(minibatches(x, x, 5, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([b for b, _ in ordered]), x)
    assert np.shares_memory(ordered[0][0], x)  # slices, not copies
    exact = list(minibatches(x, x, 23, drop_last=True))
    assert len(exact) == 1 and len(exact[0][0]) == 23


def test_minibatches_errors_are_eager():
    x = np.zeros((10, 2))
    for bad in (0, -1, 2.5, True):
        with raises_data_error("batch_size must be an integer >= 1"):
            minibatches(x, x, bad)
    with raises_data_error("batch_size 11 is larger than the dataset \\(10 examples\\)"):
        minibatches(x, x, 11)
    with raises_data_error("empty dataset"):
        minibatches(x[:0], x[:0], 1)
    with raises_data_error("x has 10 examples but y has 9"):
        minibatches(x, x[:9], 2)


# -------------------------------------------------------------------------- text
def test_load_text_errors(tmp_path):
    with raises_data_error("cannot read the text file", tmp_path / "missing.txt"):
        load_text(tmp_path / "missing.txt")
    with raises_data_error("cannot read the text file", tmp_path):
        load_text(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with raises_data_error("the text file is empty", empty):
        load_text(empty)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("naïve café".encode("latin-1"))
    with raises_data_error("not valid UTF-8 at byte offset 2", latin1):
        load_text(latin1)
    cut = tmp_path / "cut.txt"
    cut.write_bytes("abc é".encode()[:-1])
    with raises_data_error("not valid UTF-8 at byte offset 4", cut):
        load_text(cut)


def test_load_text_utf8(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("naïve — 🎭\n", encoding="utf-8")
    assert load_text(path) == "naïve — 🎭\n"


@pytest.fixture(scope="module")
def shakespeare():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} absent (the shared data folder beside the checkout)")
    return SHAKESPEARE


def test_shakespeare_file_checksum(shakespeare):
    data = shakespeare.read_bytes()
    assert len(data) == text_module.TINY_SHAKESPEARE_BYTES == 1_115_394
    assert hashlib.sha256(data).hexdigest() == text_module.TINY_SHAKESPEARE_SHA256


def test_char_tokenizer_on_shakespeare(shakespeare):
    text = load_text(shakespeare)
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.vocab_size == 65
    assert tokenizer.vocab == "".join(sorted(set(text)))
    assert tokenizer.vocab.startswith("\n !$&',-.3:;?ABC") and tokenizer.vocab.endswith("xyz")
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert ids.min() == 0 and ids.max() == 64
    assert tokenizer.decode(ids) == text
    rebuilt = CharTokenizer(tokenizer.vocab)
    np.testing.assert_array_equal(rebuilt.encode(text[:1000]), ids[:1000])
    # Spot-check the mapping against a plain dict.
    lookup = {c: i for i, c in enumerate(tokenizer.vocab)}
    assert ids[:200].tolist() == [lookup[c] for c in text[:200]]


def test_char_tokenizer_unicode_and_errors():
    tokenizer = CharTokenizer.from_text("héllo wörld 🎭!")
    assert tokenizer.decode(tokenizer.encode("wörld 🎭")) == "wörld 🎭"
    assert tokenizer.encode("").shape == (0,) and tokenizer.decode([]) == ""
    with raises_data_error(r"character 'z' \(U\+007A\) at position 3 is not in the vocabulary"):
        tokenizer.encode("hölz")
    with raises_data_error("character '€'"):
        tokenizer.encode("€")  # code point beyond the lookup table
    with raises_data_error(r"id 99 at position 1 is outside the vocabulary \(0..10\)"):
        tokenizer.decode([0, 99])
    with raises_data_error("id -1"):
        tokenizer.decode(np.array([-1]))
    with raises_data_error("repeats"):
        CharTokenizer("abca")
    with raises_data_error("non-empty"):
        CharTokenizer("")
    with raises_data_error("empty text"):
        CharTokenizer.from_text("")


def test_split_train_val():
    ids = np.arange(1000)
    train, val = split_train_val(ids)
    assert len(train) == 900 and len(val) == 100
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with raises_data_error("strictly between 0 and 1"):
            split_train_val(ids, bad)
    with raises_data_error("leaves an empty part"):
        split_train_val(np.arange(5), 0.1)


def test_random_windows_shapes_and_shift():
    ids = np.arange(100, dtype=np.int32) * 3
    x, y = random_windows(ids, block_size=8, batch_size=16, rng=0)
    assert x.shape == y.shape == (16, 8) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    starts = x[:, 0] // 3
    np.testing.assert_array_equal(x, ids[starts[:, None] + np.arange(8)])
    np.testing.assert_array_equal(y, ids[starts[:, None] + np.arange(1, 9)])
    assert starts.min() >= 0 and starts.max() <= 100 - 8 - 1
    again, _ = random_windows(ids, 8, 16, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(x, again)
    # The last possible start (len - block_size - 1) is reachable and nothing beyond.
    x, y = random_windows(np.arange(9), 8, 50, rng=0)
    assert (x[:, 0] == 0).all() and (y[:, -1] == 8).all()
    seen = np.unique(random_windows(ids, 8, 4000, rng=1)[0][:, 0] // 3)
    np.testing.assert_array_equal(seen, np.arange(92))


def test_random_windows_too_short():
    with raises_data_error("8 tokens are too few for block_size 8"):
        random_windows(np.arange(8), 8, 2, rng=0)


def test_tiny_shakespeare_path(shakespeare, cache, monkeypatch, tmp_path):
    assert tiny_shakespeare_path(shakespeare) == shakespeare
    with raises_data_error("no such text file", tmp_path / "nope.txt"):
        tiny_shakespeare_path(tmp_path / "nope.txt")
    with raises_data_error("download=False"):
        tiny_shakespeare_path(download=False)
    # Download (monkeypatched): served bytes pass sha256 and size, land in the cache.
    requested = []
    serve(monkeypatch, {"input.txt": shakespeare.read_bytes()}, requested)
    path = tiny_shakespeare_path()
    assert requested == [
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    ]
    assert path == cache / "tinyshakespeare" / "input.txt"
    assert path.read_bytes() == shakespeare.read_bytes()
    requested.clear()
    assert tiny_shakespeare_path() == path and requested == []  # cached now
    # A cached file that is not the real one is refused, not silently used.
    path.write_text("To be or not to be\n")
    with raises_data_error("not the tiny-Shakespeare file", path):
        tiny_shakespeare_path()


def test_tiny_shakespeare_download_mismatch(shakespeare, cache, monkeypatch):
    serve(monkeypatch, {"input.txt": shakespeare.read_bytes()[:-1] + b"?"}, [])
    with raises_data_error("failed its checksum"):
        tiny_shakespeare_path()
    assert list((cache / "tinyshakespeare").iterdir()) == []
