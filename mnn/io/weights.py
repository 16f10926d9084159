"""A model's weights and the config that rebuilds it, in one safetensors file: ``save_model`` and ``load_model``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy

from mnn.errors import CheckpointError
from mnn.io.safetensors import (
    CHECKPOINT_KIND,
    OPTIM_PREFIX,
    decode_metadata,
    read_tensors,
    save_tensors,
)


def config_dict(config) -> dict:
    """A model's config as a JSON-ready dict (dataclasses are converted)."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def save_model(path, model, **extra_metadata) -> Path:
    """Save ``model.state_dict()`` and ``model.config`` to a safetensors file."""
    from mnn import __version__  # noqa: PLC0415 - avoid an import cycle at module load

    metadata = {"format": "pt", "mnn_version": __version__, "config": config_dict(model.config), **extra_metadata}
    return save_tensors(path, model.state_dict(), metadata)


def check_weights(tensors: dict, name: str) -> None:
    """Refuse weights that are not floating point or hold NaN/inf (mnn never writes those).

    The one integer entry allowed is BatchNorm's ``num_batches_tracked`` buffer (int64, as PyTorch's).
    """
    for key, array in tensors.items():
        if key.rsplit(".", 1)[-1] == "num_batches_tracked" and numpy.issubdtype(array.dtype, numpy.integer):
            continue
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
