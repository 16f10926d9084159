"""PyTorch (nanoGPT) interop: a GPT exported to, or imported from, nanoGPT's state dict as safetensors.

mnn's GPT already uses nanoGPT's parameter names, so :func:`export_gpt`
writes a file that ``safetensors.torch.load_file`` reads straight into a
nanoGPT ``GPT`` (``load_state_dict(strict=True)``), and :func:`import_gpt`
builds an mnn GPT from a nanoGPT state dict saved as safetensors (float32,
float16 or bfloat16), see its docstring for the ``attn.bias`` buffers and the
tied ``lm_head.weight``.
"""

from __future__ import annotations

from pathlib import Path

import numpy

from mnn.backend import to_numpy
from mnn.errors import CheckpointError
from mnn.io.safetensors import decode_metadata, read_tensors, save_tensors
from mnn.io.weights import config_dict, load_model

TORCH_PREFIX = "_orig_mod."  # what torch.compile prepends to every name (nanoGPT strips it too)
TORCH_EXPORT_DTYPES = {"float32": numpy.float32, "float16": numpy.float16}


def export_gpt(model, path, dtype: str = "float32", vocab: str | None = None) -> Path:
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
        model: an mnn ``GPT``, or the path of an mnn GPT weights file or checkpoint.
        path: where to write.
        dtype: ``"float32"`` (default) or ``"float16"``.
        vocab: the character vocabulary (character ``i`` is token ``i``), kept in the metadata as
            ``vocab`` so that a PyTorch user can decode; by default that of the file ``model`` names.
    """
    if isinstance(model, (str, Path)):
        model, saved = load_model(model)
        vocab = vocab if vocab is not None else saved.get("vocab")
    if dtype not in TORCH_EXPORT_DTYPES:
        raise ValueError(f"export_gpt: dtype must be one of {sorted(TORCH_EXPORT_DTYPES)}, got {dtype!r}")
    if not hasattr(model, "transformer"):
        raise CheckpointError(f"export_gpt: expected a GPT, got {type(model).__name__}")
    tensors = {k: to_numpy(v).astype(TORCH_EXPORT_DTYPES[dtype]) for k, v in model.state_dict().items()}
    from mnn import __version__  # noqa: PLC0415

    metadata = {"format": "pt", "mnn_version": __version__, "config": config_dict(model.config)}
    if vocab is not None:
        metadata["vocab"] = str(vocab)
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
    from mnn.models.gpt import GPT, GPTConfig  # noqa: PLC0415

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
