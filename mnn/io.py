"""Weights on disk: safetensors files (never pickle) with the model config as JSON metadata.

A file holds every entry of ``model.state_dict()`` under its dotted name and
``__metadata__`` with ``format`` (``"pt"``, so PyTorch's safetensors reader
accepts it), ``mnn_version`` and ``config`` (the JSON that rebuilds the model).
Writes are atomic: a temporary file in the same folder is written, flushed,
fsync'd and renamed over the old one, so a crash never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy

from mnn.backend import to_numpy
from mnn.errors import CheckpointError

HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the JSON header
JSON_METADATA = ("config", "train_config", "step", "rng")  # metadata values stored as JSON text


def _safetensors_numpy():
    try:
        import safetensors.numpy  # noqa: PLC0415 - optional dependency, imported on use
    except ImportError as error:  # pragma: no cover - depends on the install
        raise RuntimeError("reading and writing weights needs safetensors: pip install 'manual-nn[cli]'") from error
    return safetensors.numpy


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a fsync'd temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


def save_tensors(path, tensors: dict, metadata: dict) -> Path:
    """Save host copies of ``tensors`` with string ``metadata`` (values JSON-encoded when not strings)."""
    host = {name: numpy.ascontiguousarray(to_numpy(array)) for name, array in tensors.items()}
    text = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    return atomic_write_bytes(path, _safetensors_numpy().save(host, metadata=text))


def read_tensors(path) -> tuple[dict, dict]:
    """Read a safetensors file into ``(tensors, metadata)``, refusing anything malformed.

    Raises:
        CheckpointError: missing, empty, truncated or corrupted file, or not safetensors.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror})") from None
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({len(data)} bytes, empty or truncated)")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(HEADER_LIMIT, len(data) - 8):
        raise CheckpointError(f"{path}: not a safetensors file (header of {header_size} bytes "
                              f"in a file of {len(data)}): truncated or foreign")
    try:
        header = json.loads(data[8:8 + header_size])
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("metadata is not a mapping")
        tensors = _safetensors_numpy().load(data)
    except Exception as error:  # safetensors raises its own error types for broken payloads
        raise CheckpointError(f"{path}: corrupted safetensors file ({error})") from None
    return tensors, metadata


def save_model(path, model, **extra_metadata) -> Path:
    """Save ``model.state_dict()`` and ``model.config`` to a safetensors file."""
    from mnn import __version__  # noqa: PLC0415 - avoid an import cycle at module load

    config = model.config
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    metadata = {"format": "pt", "mnn_version": __version__, "config": config, **extra_metadata}
    return save_tensors(path, model.state_dict(), metadata)


def load_model(path):
    """Rebuild the model saved at ``path`` (config from its metadata) and load its weights.

    Returns:
        ``(model, metadata)`` with the metadata's JSON values decoded.

    Raises:
        CheckpointError: the file is unreadable, not mnn's, or does not match its own config.
    """
    from mnn.models import model_from_config  # noqa: PLC0415

    tensors, metadata = read_tensors(path)
    if "config" not in metadata:
        raise CheckpointError(f"{path}: not an mnn weights file (no 'config' in its metadata)")
    decoded = dict(metadata)
    for key in JSON_METADATA:
        if key in metadata:
            try:
                decoded[key] = json.loads(metadata[key])
            except ValueError:
                raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON") from None
    try:
        model = model_from_config(decoded["config"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: its config cannot build a model ({error})") from None
    model.load_state_dict(tensors)
    return model, decoded
