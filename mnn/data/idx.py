"""Read and write IDX files, the format of MNIST and Fashion-MNIST, raw or gzip-compressed.

An IDX file is a 4-byte magic number, one big-endian uint32 per dimension,
then the array itself, big-endian, in C order::

    byte 0, 1   0x00 0x00
    byte 2      dtype code: 0x08 uint8, 0x09 int8, 0x0B int16,
                            0x0C int32, 0x0D float32, 0x0E float64
    byte 3      number of dimensions, ndim >= 1
    4 * ndim    the size of each dimension
    payload     prod(dims) * itemsize bytes, nothing more

:func:`read_idx` checks every one of these facts and raises
:class:`mnn.errors.DataError`, naming the file and what is wrong, for any
file that breaks one: truncated, padded, corrupted or simply not IDX.
"""

from __future__ import annotations

import gzip as gzip_module
import math
import zlib
from pathlib import Path

import numpy

from mnn.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"

#: IDX dtype code -> numpy dtype (big-endian on disk). 0x0A is unassigned.
IDX_DTYPES = {
    0x08: numpy.dtype(">u1"),
    0x09: numpy.dtype(">i1"),
    0x0B: numpy.dtype(">i2"),
    0x0C: numpy.dtype(">i4"),
    0x0D: numpy.dtype(">f4"),
    0x0E: numpy.dtype(">f8"),
}
_CODE_OF_DTYPE = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}

#: Each dimension is a 32-bit integer in the format; the sign bit is never set.
MAX_DIM = 2**31 - 1
_CHUNK = 1 << 24  # read 16 MiB at a time, so a lying header cannot allocate terabytes


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(2) == GZIP_MAGIC


def _read_exactly(file, size: int) -> bytes:
    """Read up to ``size`` bytes in chunks; fewer only when the stream ends first."""
    parts, remaining = [], size
    while remaining > 0:
        part = file.read(min(remaining, _CHUNK))
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _parse(file, name: str) -> numpy.ndarray:
    """Parse an IDX stream; every problem raises DataError naming ``name``."""
    magic = file.read(4)
    if len(magic) == 0:
        raise DataError(f"{name}: empty file, expected an IDX header")
    if len(magic) < 4:
        raise DataError(f"{name}: truncated header: {len(magic)} bytes, the magic number needs 4")
    if magic[0] != 0 or magic[1] != 0:
        raise DataError(
            f"{name}: bad magic number {magic.hex(' ')}: an IDX file starts with two zero bytes"
        )
    code, ndim = magic[2], magic[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{name}: bad dtype code 0x{code:02X} in the magic number (known: {known})")
    if ndim == 0:
        raise DataError(f"{name}: bad magic number: ndim is 0, IDX arrays have 1 or more dimensions")
    header = file.read(4 * ndim)
    if len(header) < 4 * ndim:
        raise DataError(
            f"{name}: truncated header: {ndim} dimensions need {4 * ndim} bytes, got {len(header)}"
        )
    dims = tuple(int.from_bytes(header[4 * i : 4 * i + 4], "big") for i in range(ndim))
    for axis, size in enumerate(dims):
        if not 1 <= size <= MAX_DIM:
            raise DataError(f"{name}: bad dimension {axis} of size {size} in shape {dims}")
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    payload = _read_exactly(file, expected)
    if len(payload) < expected:
        raise DataError(
            f"{name}: truncated payload: shape {dims} of {dtype.newbyteorder('=').name} "
            f"needs {expected} bytes, got {len(payload)}"
        )
    if file.read(1):
        raise DataError(
            f"{name}: trailing bytes after the {expected}-byte payload of shape {dims}"
        )
    return numpy.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path) -> numpy.ndarray:
    """Read an IDX file (raw, or gzip: detected by its ``1f 8b`` magic, not its name).

    Args:
        path: the file.

    Returns:
        A native-endian numpy array with the shape and dtype the header declares.

    Raises:
        DataError: the file is missing or unreadable, not IDX, truncated, has
            bytes after the payload, or is a corrupted gzip stream; the message
            names the file and the problem.
    """
    path = Path(path)
    name = str(path)
    try:
        if _is_gzip(path):
            with gzip_module.open(path, "rb") as file:
                return _parse(file, name)
        with open(path, "rb") as file:
            return _parse(file, name)
    except DataError:
        raise
    except (EOFError, zlib.error, gzip_module.BadGzipFile) as error:
        raise DataError(f"{name}: corrupted gzip stream ({error})") from error
    except OSError as error:
        reason = error.strerror or str(error)
        raise DataError(f"{name}: cannot read the file ({reason})") from error


def write_idx(path, array, gzip: bool = False) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``gzip``); returns the path.

    Raises:
        DataError: the dtype has no IDX code (use uint8, int8, int16, int32,
            float32 or float64) or the shape does not fit the format.
    """
    path = Path(path)
    array = numpy.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODE_OF_DTYPE:
        raise DataError(
            f"{path}: cannot write dtype {array.dtype.name} as IDX "
            "(supported: uint8, int8, int16, int32, float32, float64)"
        )
    if not 1 <= array.ndim <= 255 or not all(1 <= size <= MAX_DIM for size in array.shape):
        raise DataError(f"{path}: shape {array.shape} does not fit the IDX format")
    header = bytes([0, 0, _CODE_OF_DTYPE[native], array.ndim])
    header += b"".join(size.to_bytes(4, "big") for size in array.shape)
    payload = numpy.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    with open(path, "wb") as raw:
        if gzip:
            # mtime=0 and no file name in the header: the same array gives the same bytes.
            with gzip_module.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as file:
                file.write(header + payload)
        else:
            raw.write(header + payload)
    return path


__all__ = ["read_idx", "write_idx", "IDX_DTYPES"]
