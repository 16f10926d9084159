"""Weights on disk: safetensors files (never pickle), read strictly, and moved to and from PyTorch.

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

PyTorch (nanoGPT) interop: mnn's GPT already uses nanoGPT's parameter names,
so :func:`export_gpt` writes a file that ``safetensors.torch.load_file``
reads straight into a nanoGPT ``GPT`` (``load_state_dict(strict=True)``), and
:func:`import_gpt` builds an mnn GPT from a nanoGPT state dict saved as
safetensors (float32, float16 or bfloat16), see its docstring for the
``attn.bias`` buffers and the tied ``lm_head.weight``.
"""

from __future__ import annotations

import dataclasses
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
CHECKPOINT_KIND = "mnn-checkpoint"  # metadata "kind" of a full training checkpoint (mnn.checkpoint)
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


def config_dict(config) -> dict:
    """A model's config as a JSON-ready dict (dataclasses are converted)."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def save_model(path, model, **extra_metadata) -> Path:
    """Save ``model.state_dict()`` and ``model.config`` to a safetensors file."""
    from mnn import __version__  # noqa: PLC0415 - avoid an import cycle at module load

    metadata = {"format": "pt", "mnn_version": __version__, "config": config_dict(model.config), **extra_metadata}
    return save_tensors(path, model.state_dict(), metadata)


def check_weights(tensors: dict, name: str) -> None:
    """Refuse weights that are not floating point or hold NaN/inf (mnn never writes those)."""
    for key, array in tensors.items():
        if not numpy.issubdtype(array.dtype, numpy.floating):
            raise CheckpointError(f"{name}: weight {key!r} has dtype {array.dtype.name}, expected floating point")
        if not numpy.isfinite(array).all():
            raise CheckpointError(f"{name}: weight {key!r} holds NaN or infinite values")


def check_config_shapes(config: dict, tensors: dict, name: str) -> None:
    """Refuse a config that disagrees with the tensors' shapes, before any model is built from it.

    This keeps a corrupted config (say ``n_layer: 9000``) from allocating a
    model much larger than the file.
    """
    def shape(key):
        return tuple(tensors[key].shape) if key in tensors else None

    try:
        kind = config.get("kind", "gpt" if "n_layer" in config else None)
        if kind == "mlp":
            sizes = [config["in_features"], *config["hidden"], config["num_classes"]]
            expected = {f"{2 * i + i * (config.get('dropout', 0) > 0)}.weight": (sizes[i + 1], sizes[i])
                        for i in range(len(sizes) - 1)}
        elif kind == "gpt":
            layers = {key.split(".")[2] for key in tensors if key.startswith("transformer.h.")}
            if len(layers) != config["n_layer"]:
                raise CheckpointError(f"{name}: config says n_layer={config['n_layer']}, the file holds "
                                      f"{len(layers)} layers")
            expected = {"transformer.wte.weight": (config["vocab_size"], config["n_embd"]),
                        "transformer.wpe.weight": (config["block_size"], config["n_embd"])}
        else:
            return  # model_from_config names the unknown kind
    except (TypeError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{name}: its config cannot build a model ({error!r})") from None
    for key, wanted in expected.items():
        if shape(key) != tuple(wanted):
            raise CheckpointError(f"{name}: config expects {key} of shape {tuple(wanted)}, the file has {shape(key)}")


def load_model(path):
    """Rebuild the model saved at ``path`` (config from its metadata) and load its weights.

    Accepts a weights file (``model.safetensors``) or a full training
    checkpoint (``checkpoint.safetensors``: its optimizer entries are ignored).

    Returns:
        ``(model, metadata)`` with the metadata's JSON values decoded.

    Raises:
        CheckpointError: the file is unreadable, not mnn's, or does not match its own config.
    """
    from mnn.models import model_from_config  # noqa: PLC0415

    tensors, metadata = read_tensors(path)
    if "config" not in metadata:
        raise CheckpointError(f"{path}: not an mnn weights file (no 'config' in its metadata)")
    decoded = decode_metadata(metadata, str(path))
    if decoded.get("kind") == CHECKPOINT_KIND:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(OPTIM_PREFIX)}
    if not isinstance(decoded["config"], dict):
        raise CheckpointError(f"{path}: its config is not a JSON object")
    check_config_shapes(decoded["config"], tensors, str(path))
    check_weights(tensors, str(path))
    try:
        model = model_from_config(decoded["config"])
    except Exception as error:  # noqa: BLE001 - the config is untrusted data: any failure is a bad file
        raise CheckpointError(f"{path}: its config cannot build a model ({error})") from None
    model.load_state_dict(tensors)
    return model, decoded


# --------------------------------------------------------------------------
# PyTorch (nanoGPT) interop
# --------------------------------------------------------------------------
TORCH_PREFIX = "_orig_mod."  # what torch.compile prepends to every name (nanoGPT strips it too)
TORCH_EXPORT_DTYPES = {"float32": numpy.float32, "float16": numpy.float16}


def export_gpt(model, path, dtype: str = "float32") -> Path:
    """Write an mnn GPT as a safetensors file that nanoGPT's PyTorch ``GPT`` loads strictly.

    The names are nanoGPT's (``transformer.wte.weight``, ...,
    ``lm_head.weight``). ``lm_head.weight`` is written as its own copy of the
    tied embedding, because ``model.state_dict()`` in PyTorch lists both names
    and ``load_state_dict(strict=True)`` wants both; loading puts the same
    values into the one shared tensor. No ``attn.bias`` mask buffers are
    written: nanoGPT on PyTorch >= 2 has none (flash attention); with an older
    PyTorch load with ``strict=False``. Use it as::

        state = safetensors.torch.load_file(path)
        torch_model.load_state_dict(state)

    Note that mnn's GELU is GPT-2's tanh form; nanoGPT's ``nn.GELU()`` is the
    exact erf form, so its logits differ by about 1e-3 unless its MLP uses
    ``nn.GELU(approximate="tanh")``.

    Args:
        model: an mnn ``GPT``, or the path of an mnn GPT weights file.
        path: where to write.
        dtype: ``"float32"`` (default) or ``"float16"``.
    """
    if isinstance(model, (str, Path)):
        model, _ = load_model(model)
    if dtype not in TORCH_EXPORT_DTYPES:
        raise ValueError(f"export_gpt: dtype must be one of {sorted(TORCH_EXPORT_DTYPES)}, got {dtype!r}")
    if not hasattr(model, "transformer"):
        raise CheckpointError(f"export_gpt: expected a GPT, got {type(model).__name__}")
    tensors = {k: to_numpy(v).astype(TORCH_EXPORT_DTYPES[dtype]) for k, v in model.state_dict().items()}
    from mnn import __version__  # noqa: PLC0415

    metadata = {"format": "pt", "mnn_version": __version__, "config": config_dict(model.config)}
    return save_tensors(path, tensors, metadata)


def import_gpt(path, n_head: int | None = None, dropout: float = 0.0):
    """Build an mnn GPT from a nanoGPT-style PyTorch state dict saved as safetensors.

    The state dict is e.g. ``safetensors.torch.save_file({k: v.contiguous() for
    k, v in model.state_dict().items() if k != "lm_head.weight"}, path)``.
    Handled:

    * dtypes float32, float64, float16 and bfloat16 (converted exactly to
      mnn's default float dtype when it can hold them);
    * ``transformer.h.{i}.attn.bias`` (and ``attn.masked_bias``): the causal
      mask buffers of nanoGPT without flash attention. They are not weights:
      they are checked to be the lower-triangular mask mnn applies anyway,
      and dropped;
    * ``lm_head.weight``: tied to ``transformer.wte.weight`` in nanoGPT. Either
      name may be missing (``safetensors.torch.save_model`` keeps only one
      of two shared tensors); when both are present they must be equal,
      since an mnn GPT always ties them;
    * the ``_orig_mod.`` prefix of a ``torch.compile``-d model.

    The config is read from the shapes (``vocab_size``, ``n_embd``,
    ``block_size``, ``n_layer``, ``bias``); ``n_head`` cannot be, so it comes
    from the file's ``config`` metadata (files written by :func:`export_gpt`)
    or the ``n_head`` argument.

    Raises:
        CheckpointError: not safetensors, not a nanoGPT GPT, untied head,
            unexpected or mis-shaped entries, or no way to know ``n_head``.
    """
    from mnn.backend import default_dtype  # noqa: PLC0415
    from mnn.gpt import GPT, GPTConfig  # noqa: PLC0415

    tensors, metadata = read_tensors(path)
    tensors = {k[len(TORCH_PREFIX):] if k.startswith(TORCH_PREFIX) else k: v for k, v in tensors.items()}
    for key in [k for k in tensors if k.endswith((".attn.bias", ".attn.masked_bias"))]:
        mask = tensors.pop(key)
        if key.endswith(".attn.bias") and not (mask.ndim >= 2 and mask.shape[-1] == mask.shape[-2] and numpy.array_equal(
                mask.reshape(mask.shape[-2:]) != 0, numpy.tril(numpy.ones(mask.shape[-2:], dtype=bool)))):
            raise CheckpointError(f"{path}: {key} is not a causal mask (shape {mask.shape})")
    wte, head = tensors.get("transformer.wte.weight"), tensors.pop("lm_head.weight", None)
    if wte is None and head is None:
        raise CheckpointError(f"{path}: not a nanoGPT GPT (no transformer.wte.weight or lm_head.weight)")
    if wte is not None and head is not None and not numpy.array_equal(wte, head):
        raise CheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight; an mnn GPT ties them")
    tensors["transformer.wte.weight"] = wte if wte is not None else head
    if "transformer.wpe.weight" not in tensors or tensors["transformer.wte.weight"].ndim != 2:
        raise CheckpointError(f"{path}: not a nanoGPT GPT (no 2-D transformer.wte/wpe weights)")
    saved = {}
    if "config" in metadata:
        saved = decode_metadata(metadata, str(path))["config"]
        saved = saved if isinstance(saved, dict) else {}
    n_head = n_head or saved.get("n_head")
    if not isinstance(n_head, int) or n_head < 1:
        raise CheckpointError(f"{path}: n_head cannot be read from the weights; pass n_head=")
    vocab_size, n_embd = tensors["transformer.wte.weight"].shape
    layers = {key.split(".")[2] for key in tensors if key.startswith("transformer.h.")}
    config = GPTConfig(block_size=int(tensors["transformer.wpe.weight"].shape[0]), vocab_size=int(vocab_size),
                       n_layer=len(layers), n_head=n_head, n_embd=int(n_embd), dropout=float(dropout),
                       bias="transformer.ln_f.bias" in tensors)
    if n_embd % n_head:
        raise CheckpointError(f"{path}: n_embd {n_embd} is not divisible by n_head {n_head}")
    dtype = numpy.dtype(default_dtype())
    for key, array in tensors.items():
        if not numpy.issubdtype(array.dtype, numpy.floating):
            raise CheckpointError(f"{path}: weight {key!r} has dtype {array.dtype.name}, expected floating point")
        if not numpy.isfinite(array).all():
            raise CheckpointError(f"{path}: weight {key!r} holds NaN or infinite values")
        tensors[key] = array.astype(dtype)
    model = GPT(config, dtype=dtype.type)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    model.load_state_dict(tensors)
    return model
