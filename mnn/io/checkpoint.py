"""Training checkpoints: weights, optimizer state, position and every random generator, in one file.

``DIR/checkpoint.safetensors`` holds everything a run needs to continue
exactly where it stopped, and nothing executable:

* the model's ``state_dict()`` under its own names;
* the optimizer's ``state_dict()`` (``step``, moments) under ``optim.``;
* ``__metadata__``: ``format`` (``"pt"``), ``mnn_version``, ``kind``
  (``"mnn-checkpoint"``), ``config`` (the model's), ``train_config`` (the
  run's options), ``step``, ``rng`` (the state of every
  ``numpy.random.Generator`` the run draws from: batch order, evaluation
  batches, each dropout layer's masks) and ``state`` (the loop's position and
  bookkeeping: epoch, batch, best validation loss, history, ...).

:func:`load_checkpoint` checks the whole file against the model, the
optimizer and the generators *before* it copies anything, so a refused file
leaves all three untouched. A checkpoint is never written with non-finite
weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy

from mnn.backend import xp
from mnn.errors import CheckpointError, TrainingError
from mnn.io.safetensors import CHECKPOINT_KIND, OPTIM_PREFIX, decode_metadata, read_tensors, save_tensors
from mnn.io.weights import config_dict

CHECKPOINT_NAME = "checkpoint.safetensors"
WEIGHTS_NAME = "model.safetensors"


def model_generators(model, prefix: str = "model") -> dict:
    """Every distinct ``numpy.random.Generator`` a module of ``model`` holds as ``.rng``, by module name.

    A generator shared by several modules (the GPT's dropout layers share one)
    is listed once, under the first module's name.
    """
    found, seen = {}, set()
    for name, module in model.named_modules():
        rng = getattr(module, "rng", None)
        if isinstance(rng, numpy.random.Generator) and id(rng) not in seen:
            seen.add(id(rng))
            found[f"{prefix}.{name}" if name else prefix] = rng
    return found


def weights_finite(model) -> bool:
    """True when no parameter of ``model`` holds NaN or inf."""
    return all(bool(xp.isfinite(param).all()) for _, param in model.named_parameters())


def check_finite(model, step: int) -> None:
    """Refuse to save weights holding NaN or inf (a good checkpoint is never overwritten by them)."""
    for name, param in model.named_parameters():
        if not bool(xp.isfinite(param).all()):
            raise TrainingError(f"the weights became non-finite ({name}) by step {step}; nothing was saved")


def save_checkpoint(path, model, optimizer, generators: dict, train_config: dict, step: int,
                    state: dict, **extra_metadata) -> Path:
    """Write the full training state to ``path`` atomically.

    Args:
        path: the checkpoint file (usually ``DIR/checkpoint.safetensors``).
        model: its ``state_dict()`` and ``config`` are saved.
        optimizer: its ``state_dict()`` is saved under ``optim.``.
        generators: ``{name: numpy.random.Generator}``, every source of randomness of the run.
        train_config: the run's options (JSON-ready).
        step: the number of optimizer steps taken.
        state: the loop's own position and bookkeeping (JSON-ready).
        extra_metadata: more string metadata (e.g. ``vocab``).

    Raises:
        TrainingError: a weight is NaN or infinite (nothing is written).
    """
    from mnn import __version__  # noqa: PLC0415

    check_finite(model, step)
    tensors = dict(model.state_dict())
    tensors.update({OPTIM_PREFIX + key: value for key, value in optimizer.state_dict().items()})
    metadata = {"format": "pt", "mnn_version": __version__, "kind": CHECKPOINT_KIND,
                "config": config_dict(model.config), "train_config": train_config, "step": int(step),
                "rng": {name: rng.bit_generator.state for name, rng in generators.items()},
                "state": state, **extra_metadata}
    return save_tensors(path, tensors, metadata)


def read_checkpoint(path) -> tuple[dict, dict]:
    """Read and decode a checkpoint file: ``(tensors, metadata)``; refuse anything that is not one."""
    tensors, metadata = read_tensors(path)
    return tensors, _check_kind(metadata, path)


def read_checkpoint_metadata(path) -> dict:
    """Only the decoded metadata of a checkpoint (the run's options, before any model exists)."""
    return read_checkpoint(path)[1]


def _check_kind(metadata: dict, path) -> dict:
    if metadata.get("kind") != CHECKPOINT_KIND:
        what = "an mnn weights file, not a training checkpoint" if "config" in metadata else "not an mnn checkpoint"
        raise CheckpointError(f"{path}: {what} (no kind={CHECKPOINT_KIND!r} in its metadata)")
    if "crc32" not in metadata:
        raise CheckpointError(f"{path}: checkpoint without its checksum (crc32): corrupted header")
    decoded = decode_metadata(metadata, str(path))
    for key, kind in [("config", dict), ("train_config", dict), ("step", int), ("rng", dict), ("state", dict)]:
        if not isinstance(decoded.get(key), kind):
            raise CheckpointError(f"{path}: checkpoint metadata {key!r} is missing or not a JSON {kind.__name__}")
    return decoded


def _state_problems(own: dict, state: dict, floating: bool) -> list[str]:
    """Every missing, unexpected, mis-shaped, mis-typed or non-finite entry of ``state`` against ``own``."""
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected))
    for key in own:
        if key not in state:
            continue
        array = state[key]
        if tuple(array.shape) != tuple(own[key].shape):
            problems.append(f"{key}: expected shape {tuple(own[key].shape)}, got {tuple(array.shape)}")
        elif floating and key != "step" and numpy.issubdtype(own[key].dtype, numpy.integer):
            if not numpy.issubdtype(array.dtype, numpy.integer):  # an integer buffer: num_batches_tracked
                problems.append(f"{key}: dtype {array.dtype.name}, expected an integer")
        elif floating and key != "step" and not numpy.issubdtype(array.dtype, numpy.floating):
            problems.append(f"{key}: dtype {array.dtype.name}, expected floating point")
        elif floating and key != "step" and not numpy.isfinite(array).all():
            problems.append(f"{key}: holds NaN or infinite values")
    return problems


def load_checkpoint(path, model, optimizer, generators: dict) -> dict:
    """Restore the model, the optimizer and the generators from a checkpoint, all or nothing.

    Checks, before anything is copied: the file is an mnn checkpoint, its
    model config equals ``model.config``, every weight and optimizer entry is
    present with the right shape and finite, and every generator state fits.

    Returns:
        The decoded metadata (``train_config``, ``step``, ``state``, ...).

    Raises:
        CheckpointError: naming each problem; the model, optimizer and generators are unchanged.
    """
    tensors, metadata = read_checkpoint(path)
    return restore(tensors, metadata, path, model, optimizer, generators)


def restore(tensors: dict, metadata: dict, path, model, optimizer, generators: dict) -> dict:
    """:func:`load_checkpoint` from already-read ``(tensors, metadata)``."""
    own_config = json.loads(json.dumps(config_dict(model.config)))
    saved_config = metadata["config"]
    if saved_config != own_config:
        keys = sorted(k for k in set(own_config) | set(saved_config) if own_config.get(k) != saved_config.get(k))
        listing = ", ".join(f"{k}: file {saved_config.get(k)!r}, model {own_config.get(k)!r}" for k in keys)
        raise CheckpointError(f"{path}: the checkpoint's model config differs from this model's ({listing})")
    weights = {k: v for k, v in tensors.items() if not k.startswith(OPTIM_PREFIX)}
    optim = {k[len(OPTIM_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)}
    problems = _state_problems(model.state_dict(), weights, floating=True)
    own_optim = {"step": numpy.zeros(())}
    own_optim.update({f"{buffer}.{name}": array for name, buffers in optimizer.state.items()
                      for buffer, array in buffers.items()})
    problems += [f"optimizer {p}" for p in _state_problems(own_optim, optim, floating=True)]
    if "step" in optim and not numpy.issubdtype(optim["step"].dtype, numpy.integer):
        problems.append(f"optimizer step: dtype {optim['step'].dtype.name}, expected an integer")
    rng_states = metadata["rng"]
    if sorted(rng_states) != sorted(generators):
        problems.append(f"random generators: the file has {sorted(rng_states)}, the run has {sorted(generators)}")
    else:
        for name, rng in generators.items():
            try:  # try each state on a scratch generator of the same kind first
                type(rng.bit_generator)().state = rng_states[name]
            except (TypeError, ValueError, KeyError, OverflowError) as error:
                problems.append(f"random generator {name}: unusable state ({error})")
    if problems:
        raise CheckpointError(f"{path}: does not fit this run: " + " | ".join(problems))
    try:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim)
    except CheckpointError as error:  # pragma: no cover - every check above runs first
        raise CheckpointError(f"{path}: {error}") from None
    for name, rng in generators.items():
        rng.bit_generator.state = rng_states[name]
    return metadata


def resume_config(folder, config_class, overrides: dict, fixed: tuple, command: str):
    """The options of the run saved in ``folder``, with ``overrides`` applied.

    Args:
        folder: the run's output folder (it holds ``checkpoint.safetensors``).
        config_class: the train-config dataclass.
        overrides: options given again on the command line.
        fixed: option names that cannot change (the model's shape, the batch order).
        command: ``"mlp"`` or ``"gpt"``, for messages.

    Raises:
        CheckpointError: no checkpoint, not an mnn checkpoint, a checkpoint of another
            model, or an override of a fixed option.
    """
    folder = Path(folder)
    path = folder / CHECKPOINT_NAME
    if not folder.is_dir():
        raise CheckpointError(f"--resume {folder}: no such folder")
    if not path.exists():
        raise CheckpointError(f"--resume {folder}: no {CHECKPOINT_NAME} in it (was the run started with "
                              f"this version of mnn?)")
    metadata = read_checkpoint_metadata(path)
    saved = metadata["train_config"]
    kind = metadata["config"].get("kind", "gpt" if "n_layer" in metadata["config"] else None)
    if kind != command:
        raise CheckpointError(f"{path}: a checkpoint of 'mnn train {kind}', not of 'mnn train {command}'")
    fields = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise CheckpointError(f"{path}: unknown options {unknown} in its train_config")
    changed = [f"--{k.replace('_', '-')} {overrides[k]!r} (the checkpoint has {saved.get(k)!r})"
               for k in fixed if k in overrides and overrides[k] != saved.get(k)]
    if changed:
        raise CheckpointError(f"cannot change on resume: {'; '.join(changed)}")
    options = {**saved, **overrides}
    if "out" not in overrides:
        options["out"] = str(folder)
    return config_class(**options)


def finite_or_none(value: float):
    """JSON has no infinity: ``inf`` (no best value yet) is stored as ``null``."""
    return value if math.isfinite(value) else None


__all__ = ["CHECKPOINT_NAME", "WEIGHTS_NAME", "check_finite", "load_checkpoint", "model_generators",
           "read_checkpoint", "resume_config", "save_checkpoint"]
