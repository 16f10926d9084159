"""The safetensors format, written byte for byte and read strictly (never pickle).

A file holds every entry of ``model.state_dict()`` under its dotted name and
``__metadata__`` with ``format`` (``"pt"``, so PyTorch's safetensors reader
accepts it), ``mnn_version`` and ``config`` (the JSON that rebuilds the model).
Writes are atomic: a temporary file in the same folder is written, flushed,
fsync'd and renamed over the old one, so a crash or a full disk never leaves
half a file where a good one was.

Why mnn lays out the bytes itself instead of calling ``safetensors.numpy.save``:
that writer stores ``__metadata__`` from a hash map, in a different order on
every call, so two saves of the same run would differ byte for byte and a
resumed run could not be checked bitwise against a straight one. The layout
written here is the safetensors format exactly (8-byte header length, JSON
header, aligned little-endian data), and the tests read every kind of file mnn
writes back with ``safetensors.numpy.load_file`` and
``safetensors.torch.load_file`` and compare every tensor.

Reading never executes anything: :func:`parse_safetensors` checks the
8-byte header length, the JSON header, every tensor's dtype, shape and byte
range (in bounds, the exact size, no overlaps or gaps) before it copies a
byte, and refuses anything else with :class:`~mnn.errors.CheckpointError`.
It also decodes ``BF16`` (exactly, to float32: a bfloat16 is the top half of
a float32), which PyTorch checkpoints often use.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy

from mnn.backend import to_numpy
from mnn.errors import CheckpointError

HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the JSON header
JSON_METADATA = ("config", "train_config", "step", "rng", "state")  # metadata values stored as JSON text
CHECKPOINT_KIND = "mnn-checkpoint"  # metadata "kind" of a full training checkpoint (mnn.io.checkpoint)
OPTIM_PREFIX = "optim."  # optimizer entries in a training checkpoint

#: safetensors dtype code -> numpy dtype on disk (little-endian). BF16 is read as raw uint16.
SAFETENSORS_DTYPES = {
    "F64": numpy.dtype("<f8"), "F32": numpy.dtype("<f4"), "F16": numpy.dtype("<f2"),
    "BF16": numpy.dtype("<u2"),
    "I64": numpy.dtype("<i8"), "I32": numpy.dtype("<i4"), "I16": numpy.dtype("<i2"), "I8": numpy.dtype("i1"),
    "U64": numpy.dtype("<u8"), "U32": numpy.dtype("<u4"), "U16": numpy.dtype("<u2"), "U8": numpy.dtype("u1"),
    "BOOL": numpy.dtype("?"),
}


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a fsync'd temporary file and an atomic rename.

    On any failure (a full disk, a signal) the temporary file is removed and
    whatever was at ``path`` before is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, _file_mode(path))  # mkstemp makes 0600; give what open() would
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, or 0666 less the umask for a new one."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def serialize_safetensors(tensors: dict, metadata: dict) -> bytes:
    """The bytes of a safetensors file holding host copies of ``tensors`` and string ``metadata``.

    Tensors are laid out largest item size first, then by name, so every one
    starts at a multiple of its item size. ``metadata["crc32"]`` is set to the
    CRC-32 of the header and the data, which :func:`parse_safetensors` checks:
    a flipped bit anywhere in the file is caught, not silently loaded.
    """
    host = {name: numpy.asarray(to_numpy(array), order="C") for name, array in tensors.items()}  # keeps 0-d
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items() if code not in ("BF16", "U16")}
    codes[numpy.dtype("<u2")] = "U16"
    header, chunks, offset = {}, [], 0
    for name in sorted(host, key=lambda n: (-host[n].dtype.itemsize, n)):
        array = host[name]
        little = array.dtype.newbyteorder("<") if array.dtype.byteorder not in ("|",) else array.dtype
        if little not in codes:
            raise ValueError(f"cannot save {name!r} of dtype {array.dtype.name} as safetensors")
        data = numpy.ascontiguousarray(array, dtype=little).tobytes()
        header[name] = {"dtype": codes[little], "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    body = b"".join(chunks)
    header["__metadata__"] = {key: value for key, value in metadata.items() if key != "crc32"}
    header["__metadata__"]["crc32"] = _checksum(header, body)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + body


def _checksum(header: dict, body) -> str:
    """CRC-32 of the header (as canonical JSON, without the checksum itself) followed by the data section."""
    metadata = {key: value for key, value in header.get("__metadata__", {}).items() if key != "crc32"}
    canonical = json.dumps({**header, "__metadata__": metadata}, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(body, zlib.crc32(canonical.encode('utf-8'))):08x}"


def save_tensors(path, tensors: dict, metadata: dict) -> Path:
    """Save host copies of ``tensors`` with string ``metadata`` (values JSON-encoded when not strings)."""
    text = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    return atomic_write_bytes(path, serialize_safetensors(tensors, text))


def parse_safetensors(data: bytes, name: str = "<bytes>") -> tuple[dict, dict]:
    """Decode the bytes of a safetensors file into ``(tensors, metadata)``, checking everything first.

    ``BF16`` tensors come back as float32 (exact); every other dtype as itself.

    Raises:
        CheckpointError: empty, truncated, padded, overlapping or otherwise not safetensors.
    """
    if len(data) < 8:
        raise CheckpointError(f"{name}: not a safetensors file ({len(data)} bytes, empty or truncated)")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(HEADER_LIMIT, len(data) - 8):
        raise CheckpointError(f"{name}: not a safetensors file (header of {header_size} bytes "
                              f"in a file of {len(data)}): truncated or foreign")
    try:
        header = json.loads(bytes(data[8:8 + header_size]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{name}: corrupted safetensors file (the header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupted safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{name}: corrupted safetensors file (__metadata__ is not a map of strings)")
    buffer = memoryview(data)[8 + header_size:]
    spans, tensors = [], {}
    for key, info in header.items():
        problem = _entry_problem(info, len(buffer))
        if problem:
            raise CheckpointError(f"{name}: corrupted safetensors file (tensor {key!r}: {problem})")
        begin, end = info["data_offsets"]
        spans.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise CheckpointError(f"{name}: corrupted safetensors file (tensor {key!r} at byte {begin}, "
                                  f"expected {position}: overlapping or missing data)")
        position = end
    if position != len(buffer):
        raise CheckpointError(f"{name}: corrupted safetensors file ({len(buffer) - position} bytes after the "
                              "last tensor)")
    if "crc32" in metadata:
        actual = _checksum({**header, "__metadata__": metadata}, buffer)
        if actual != metadata["crc32"]:
            raise CheckpointError(f"{name}: corrupted file (its CRC-32 is {actual}, the header says "
                                  f"{metadata['crc32']})")
    for begin, end, key in spans:
        info = header[key]
        stored = SAFETENSORS_DTYPES[info["dtype"]]
        array = numpy.frombuffer(buffer[begin:end], dtype=stored).reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = (array.astype(numpy.uint32) << 16).view(numpy.float32)  # bf16 = top half of a float32
        tensors[key] = array.astype(stored.newbyteorder("="), copy=True) if info["dtype"] != "BF16" else array
    return tensors, metadata


def _entry_problem(info, buffer_size: int) -> str | None:
    """What is wrong with one header entry ``{"dtype", "shape", "data_offsets"}``, or None."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        return "expected the keys dtype, shape and data_offsets"
    if info["dtype"] not in SAFETENSORS_DTYPES:
        return f"unknown dtype {info['dtype']!r}"
    shape, offsets = info["shape"], info["data_offsets"]
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(shape, list) or not all(is_int(d) for d in shape) or len(shape) > 32:
        return f"bad shape {shape!r}"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
        return f"bad data_offsets {offsets!r}"
    begin, end = offsets
    if not begin <= end <= buffer_size:
        return f"data_offsets {offsets} outside the {buffer_size}-byte data section (truncated?)"
    if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize:
        return f"{end - begin} bytes do not hold shape {shape} of {info['dtype']}"
    return None


def read_tensors(path) -> tuple[dict, dict]:
    """Read a safetensors file into ``(tensors, metadata)``, refusing anything malformed.

    Raises:
        CheckpointError: missing, unreadable, empty, truncated or corrupted file, or not safetensors.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a weights file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror})") from None
    return parse_safetensors(data, str(path))


def decode_metadata(metadata: dict, name: str) -> dict:
    """The metadata with the values listed in ``JSON_METADATA`` decoded from JSON."""
    decoded = dict(metadata)
    for key in JSON_METADATA:
        if key in metadata:
            try:
                decoded[key] = json.loads(metadata[key])
            except (ValueError, RecursionError):
                raise CheckpointError(f"{name}: metadata {key!r} is not valid JSON") from None
    return decoded
