"""Everything on disk, as safetensors (never pickle): the format, a model's weights, training checkpoints, PyTorch interop.

Read in this order: ``safetensors`` (the bytes, written and read strictly),
``weights`` (``save_model`` / ``load_model``: weights plus the config that
rebuilds the model), ``checkpoint`` (a whole training run: weights,
optimizer, generators, position), ``interop`` (nanoGPT's state dict, both ways).
"""

from mnn.io.checkpoint import (
    CHECKPOINT_NAME,
    WEIGHTS_NAME,
    load_checkpoint,
    read_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from mnn.io.interop import export_gpt, import_gpt
from mnn.io.safetensors import (
    parse_safetensors,
    read_tensors,
    save_tensors,
    serialize_safetensors,
)
from mnn.io.weights import load_model, save_model

__all__ = ["CHECKPOINT_NAME", "WEIGHTS_NAME", "export_gpt", "import_gpt", "load_checkpoint", "load_model",
           "parse_safetensors", "read_checkpoint", "read_checkpoint_metadata", "read_tensors", "save_checkpoint",
           "save_model", "save_tensors", "serialize_safetensors"]
