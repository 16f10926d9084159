"""Text for the character-level GPT: load a UTF-8 file, tokenize by character, sample windows.

The pipeline nanoGPT's ``shakespeare_char`` uses, in four calls::

    text = load_text(tiny_shakespeare_path())
    tokenizer = CharTokenizer.from_text(text)            # 65 characters
    train_ids, val_ids = split_train_val(tokenizer.encode(text), 0.9)
    x, y = random_windows(train_ids, block_size=64, batch_size=32, rng=rng)   # (B, T) each

Arrays stay numpy on the host; the training loop moves each batch to the
device with ``mnn.backend.asarray``.
"""

from __future__ import annotations

from pathlib import Path

import numpy

from mnn.data.download import _network_reason, cache_dir, download_verified, sha256_of
from mnn.errors import DataError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_BYTES = 1_115_394


def load_text(path) -> str:
    """Read a whole UTF-8 text file.

    Raises:
        DataError: the file is missing or unreadable, empty, or not valid
            UTF-8 (the message gives the byte offset of the first bad byte).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the text file ({error.strerror or error})") from error
    if not raw:
        raise DataError(f"{path}: the text file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {error.start} ({error.reason})"
        ) from error


class CharTokenizer:
    """One token per character: ids are positions in the ``vocab`` string.

    Encoding and decoding are vectorised: the text becomes an array of
    Unicode code points, mapped through a lookup table, so the 1.1 MB
    Shakespeare file encodes in milliseconds.
    """

    def __init__(self, vocab: str) -> None:
        if not isinstance(vocab, str) or not vocab:
            raise DataError(f"a vocabulary is a non-empty string, got {vocab!r}")
        if len(set(vocab)) != len(vocab):
            repeated = sorted({c for c in vocab if vocab.count(c) > 1})
            raise DataError(f"vocabulary repeats the character(s) {repeated!r}")
        self._vocab = vocab
        self._code_points = _code_points(vocab)  # (V,) id -> code point
        self._ids = numpy.full(int(self._code_points.max()) + 1, -1, dtype=numpy.int64)
        self._ids[self._code_points] = numpy.arange(len(vocab))  # code point -> id, -1 if absent

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The tokenizer whose vocabulary is the sorted set of the characters of ``text``."""
        if not text:
            raise DataError("cannot build a vocabulary from empty text")
        return cls("".join(sorted(set(text))))

    @property
    def vocab(self) -> str:
        """All characters, in id order (save this string to rebuild the tokenizer)."""
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def encode(self, text: str) -> numpy.ndarray:
        """``text`` -> int64 ids ``(len(text),)``; DataError names an unknown character."""
        points = _code_points(text)
        ids = numpy.full(len(points), -1, dtype=numpy.int64)
        known = points < len(self._ids)
        ids[known] = self._ids[points[known]]
        unknown = numpy.flatnonzero(ids < 0)
        if unknown.size:
            position = int(unknown[0])
            raise DataError(
                f"character {text[position]!r} (U+{ord(text[position]):04X}) at position "
                f"{position} is not in the vocabulary of {self.vocab_size} characters"
            )
        return ids

    def decode(self, ids) -> str:
        """int ids ``(T,)`` -> text; DataError for an id outside ``0..vocab_size-1``."""
        ids = numpy.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise DataError(f"decode expects a 1-D integer array, got {ids.dtype.name} {ids.shape}")
        bad = numpy.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            raise DataError(
                f"id {int(ids[bad[0]])} at position {int(bad[0])} is outside the vocabulary "
                f"(0..{self.vocab_size - 1})"
            )
        return self._code_points[ids.astype(numpy.intp)].astype("<u4").tobytes().decode("utf-32-le")

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _code_points(text: str) -> numpy.ndarray:
    """The Unicode code points of ``text`` as an int64 array ``(len(text),)``."""
    return numpy.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(numpy.int64)


def split_train_val(ids, fraction: float = 0.9) -> tuple[numpy.ndarray, numpy.ndarray]:
    """The first ``fraction`` of ``ids`` for training, the rest for validation (views, no copy).

    Raises:
        DataError: ``fraction`` not strictly between 0 and 1, or a part would be empty.
    """
    ids = numpy.asarray(ids)
    if not 0.0 < fraction < 1.0:
        raise DataError(f"fraction must be strictly between 0 and 1, got {fraction}")
    cut = int(len(ids) * fraction)
    if cut == 0 or cut == len(ids):
        raise DataError(f"splitting {len(ids)} tokens at fraction {fraction} leaves an empty part")
    return ids[:cut], ids[cut:]


def random_windows(ids, block_size: int, batch_size: int, rng=None):
    """Sample ``batch_size`` windows of ``block_size`` tokens and their next-token targets.

    Window ``b`` starts at a uniform random offset ``s_b`` in ``0..len(ids)-block_size-1``:
    ``x[b, t] = ids[s_b + t]`` and ``y[b, t] = ids[s_b + t + 1]``.

    Args:
        ids: int token ids ``(N,)``.
        block_size: T, the context length.
        batch_size: B.
        rng: a ``numpy.random.Generator``, a seed, or None for a fresh one.

    Returns:
        ``(x, y)``, both int64 ``(B, T)``.

    Raises:
        DataError: ``len(ids) <= block_size`` (no room for a target), or B, T < 1.
    """
    ids = numpy.asarray(ids)
    if block_size < 1 or batch_size < 1:
        raise DataError(
            f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}"
        )
    if len(ids) <= block_size:
        raise DataError(
            f"{len(ids)} tokens are too few for block_size {block_size}: "
            f"a window and its shifted target need at least {block_size + 1}"
        )
    rng = numpy.random.default_rng(rng)
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)  # (B,)
    index = starts[:, None] + numpy.arange(block_size)  # (B, T)
    return ids[index].astype(numpy.int64), ids[index + 1].astype(numpy.int64)


def tiny_shakespeare_path(data=None, download: bool = True) -> Path:
    """The tiny-Shakespeare text file: ``data`` if given, else the cached copy, else downloaded.

    The download comes from karpathy/char-rnn on raw.githubusercontent.com
    into ``<cache>/tinyshakespeare/input.txt`` and is kept only if its
    sha256 and size (1,115,394 bytes) match; a cached copy is re-checked
    (hashing 1 MB takes milliseconds).

    Raises:
        DataError: ``data`` is not an existing file; the cached copy is not the
            expected file; or no copy exists and download is off or fails.
    """
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise DataError(f"{path}: no such text file")
        return path
    cached = cache_dir() / "tinyshakespeare" / "input.txt"
    if cached.is_file():
        if sha256_of(cached) != TINY_SHAKESPEARE_SHA256:
            raise DataError(
                f"{cached}: not the tiny-Shakespeare file (sha256 differs); "
                "delete it to download again"
            )
        return cached
    if not download:
        raise DataError(f"tiny Shakespeare is not in {cached} and download=False; pass data=PATH")
    try:
        return download_verified(
            TINY_SHAKESPEARE_URL, cached, TINY_SHAKESPEARE_SHA256, size=TINY_SHAKESPEARE_BYTES
        )
    except DataError as error:
        reason = _network_reason(error)
        if reason is None:
            raise
        raise DataError(f"could not download tiny Shakespeare ({TINY_SHAKESPEARE_URL}: {reason}): place it at "
                        f"{cached} or pass --data FILE (data= in Python)") from error
