"""The ``mnn`` commands that read a saved model: ``eval``, ``sample``, ``export``, ``import``, ``summary`` (mnn.cli).

A model is a weights file, a checkpoint, or a run folder (its weights file, or its checkpoint when there
is none). What goes to stdout is the result alone (the sample's text, the metric); notes go to stderr.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy

from mnn.errors import CheckpointError, DataError, MnnError
from mnn.io import CHECKPOINT_NAME, WEIGHTS_NAME, load_model, read_checkpoint_metadata, read_tensors, save_model


def note(text: str) -> None:
    print(f"mnn: {text}", file=sys.stderr)


def saved_step(metadata: dict):
    step = metadata.get("step")
    try:
        return int(step)
    except (TypeError, ValueError):
        return None


def load(path):
    """``(model, metadata, file)`` of a weights file, a checkpoint or a run folder; a folder's choice is noted."""
    path = Path(path)
    if not path.is_dir():
        model, metadata = load_model(path)
        return model, metadata, path
    weights, checkpoint = path / WEIGHTS_NAME, path / CHECKPOINT_NAME
    if not weights.is_file() and not checkpoint.is_file():
        raise MnnError(f"{path}: a folder with neither {WEIGHTS_NAME} nor {CHECKPOINT_NAME} in it "
                       "(give a weights file or a run folder)")
    chosen = weights if weights.is_file() else checkpoint
    model, metadata = load_model(chosen)
    step = saved_step(metadata)
    message = f"using {chosen}" + (f" (step {step})" if step is not None else "")
    if chosen == weights and checkpoint.is_file() and step is not None:
        try:
            latest = saved_step(read_checkpoint_metadata(checkpoint))
        except MnnError:
            latest = None
        if latest is not None and latest > step:
            message += f"; {checkpoint} holds later weights (step {latest}): give it to use them"
    note(message)
    return model, metadata, chosen


def char_tokenizer(model, metadata: dict, path):
    """The character vocabulary saved with a language model (weights file or checkpoint); refuse any other model."""
    from mnn.data import CharTokenizer  # noqa: PLC0415

    if "vocab" not in metadata or not hasattr(model, "generate"):
        raise DataError(f"{path}: not a character-level language model (no vocabulary in its metadata)")
    return CharTokenizer(str(metadata["vocab"]))


def generate(model, tokenizer, prompt: str, tokens: int, temperature: float, top_k, rng) -> str:
    """``prompt`` and ``tokens`` characters generated after it, drawn from ``rng`` (as ``sample_file``)."""
    from mnn.backend import asarray  # noqa: PLC0415

    if not prompt:
        raise DataError("the prompt is empty: give at least one character")
    ids = tokenizer.encode(prompt)[None, :]
    model.eval()
    out = model.generate(asarray(ids), tokens, temperature=temperature, top_k=top_k, rng=rng)
    return tokenizer.decode(numpy.asarray(out)[0])


def split_loss(model, ids, windows_per_forward: int = 48) -> float:
    """Mean next-character loss over every non-overlapping window of ``block_size`` in ``ids`` (deterministic).

    Window ``i`` predicts ``ids[i T + 1 : (i + 1) T + 1]`` from ``ids[i T : (i + 1) T]``, in evaluation mode
    and under ``no_grad``; a split shorter than one window plus one character is one shorter window.
    """
    from mnn.backend import asarray, read_scalar  # noqa: PLC0415
    from mnn.losses import CrossEntropyLoss  # noqa: PLC0415
    from mnn.module import no_grad  # noqa: PLC0415

    block = min(getattr(model.config, "block_size", 256), len(ids) - 1)
    if block < 1:
        raise DataError(f"the val split has {len(ids)} character(s): at least 2 are needed to evaluate a loss")
    count = (len(ids) - 1) // block
    x, y = ids[:count * block].reshape(count, block), ids[1:count * block + 1].reshape(count, block)
    model.eval()
    loss_fn, total = CrossEntropyLoss(), 0.0
    with no_grad():
        for start in range(0, count, windows_per_forward):
            xb, yb = x[start:start + windows_per_forward], y[start:start + windows_per_forward]
            total += read_scalar(loss_fn.forward(model.forward(asarray(xb)), asarray(yb))) * len(xb)
    return total / count


def eval(args) -> int:  # noqa: A001 - the command's name
    from mnn.models import model_kind  # noqa: PLC0415

    model, metadata, path = load(args.weights)
    if "vocab" in metadata or model_kind(metadata["config"]) == "gpt":
        loss = gpt_val_loss(model, metadata, path, args.data)
        print(f"val_loss {loss:.4f} | perplexity {math.exp(loss):.2f}")
        return 0
    from mnn.train.classifier import evaluate_file  # noqa: PLC0415

    print(f"test_acc {evaluate_file(path, args.data_dir):.4f}")
    return 0


def run_settings(metadata: dict, path: Path) -> dict:
    """The options of the run that wrote ``path``: a checkpoint's settings, else the run's config.json, else ``{}``."""
    settings = metadata.get("train_config")
    if not isinstance(settings, dict):
        try:
            settings = json.loads((path.parent / "config.json").read_text())
        except (OSError, ValueError):
            settings = {}
    return settings if isinstance(settings, dict) else {}


def run_data(metadata: dict, path: Path):
    """The ``data`` option of the run that wrote ``path``: from a checkpoint's settings or the run's config.json."""
    return run_settings(metadata, path).get("data")


def gpt_val_loss(model, metadata: dict, path: Path, data) -> float:
    """Mean loss over every window of the val split (the last 10%) of the text, encoded with the model's vocabulary."""
    from mnn.data import load_text, split_train_val, tiny_shakespeare_path  # noqa: PLC0415
    tokenizer = char_tokenizer(model, metadata, path)
    if data is None:
        data = run_data(metadata, path)
        if data is not None and not Path(data).is_file():
            raise DataError(f"{path}: its run trained on {data}, which is not there now: pass --data FILE")
    text_path = tiny_shakespeare_path(data)
    _, val = split_train_val(tokenizer.encode(load_text(text_path)), 0.9)
    note(f"val split of {text_path}: {len(val):,} characters")
    return split_loss(model, val)


def read_prompt(args) -> str:
    if args.prompt_file is None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise DataError(f"--prompt-file {args.prompt_file}: cannot read it ({reason})") from None


def check_output(out, source: Path) -> Path:
    """Refuse to write over the input or onto a folder."""
    out = Path(out)
    if out.is_dir():
        raise MnnError(f"{out} is a folder: give the file to write")
    if out.exists() and out.resolve() == source.resolve():
        raise MnnError(f"{out} is the input file: writing it would overwrite the input; give another name")
    return out


def sample(args) -> int:
    prompt = read_prompt(args)
    model, metadata, path = load(args.weights)
    tokenizer = char_tokenizer(model, metadata, path)
    out = check_output(args.out, path) if args.out else None
    rng = numpy.random.default_rng(args.seed)
    text = "\n---------------\n".join(generate(model, tokenizer, prompt, args.tokens, args.temperature,
                                                 args.top_k, rng) for _ in range(args.num_samples))
    if out is None:
        print(text)
    else:
        from mnn.io.safetensors import atomic_write_bytes  # noqa: PLC0415

        atomic_write_bytes(out, (text + "\n").encode("utf-8"))
        note(f"wrote {out}")
    return 0


def export(args) -> int:
    from mnn.io import export_gpt  # noqa: PLC0415
    from mnn.models import GPT  # noqa: PLC0415

    model, metadata, path = load(args.weights)
    if not isinstance(model, GPT):
        kind = metadata["config"].get("kind", type(model).__name__.lower())
        raise MnnError(f"{path}: an {kind} model; only a GPT can be exported to PyTorch (nanoGPT's GPT)")
    out = check_output(args.out, path)
    export_gpt(model, out, dtype=args.dtype, vocab=metadata.get("vocab"))
    note(f"wrote {out} (nanoGPT's names{', with the vocabulary' if 'vocab' in metadata else ''}): "
         "safetensors.torch.load_file, then load_state_dict")
    return 0


def import_(args) -> int:
    from mnn.data import CharTokenizer, load_text  # noqa: PLC0415
    from mnn.io import import_gpt  # noqa: PLC0415

    source = Path(args.weights)
    if source.is_dir():
        raise MnnError(f"{source} is a folder: give the safetensors file to import")
    out = check_output(args.out, source)
    try:
        model = import_gpt(source, n_head=args.n_head)
    except CheckpointError as error:
        if "n_head" in str(error):
            raise CheckpointError(f"{source}: the number of heads cannot be read from a plain state dict: "
                                  "pass --n-head N") from None
        raise
    vocab = read_tensors(source)[1].get("vocab")
    if args.vocab_text is not None:
        vocab = CharTokenizer.from_text(load_text(args.vocab_text)).vocab
    if vocab is not None and len(vocab) != model.config.vocab_size:
        raise DataError(f"the vocabulary has {len(vocab)} characters, the model {model.config.vocab_size} tokens")
    save_model(out, model, **({"vocab": vocab} if vocab is not None else {}))
    note(f"wrote {out}" + ("" if vocab is not None else
                           "; it has no character vocabulary, which mnn sample needs: pass --vocab-text FILE"))
    return 0


def preset_model(name: str, preset):
    """``(model, options)``: the untrained model ``mnn train NAME --preset PRESET`` would build, and its options."""
    import dataclasses  # noqa: PLC0415

    from mnn.cli import MODEL_ALIASES, trainer  # noqa: PLC0415

    name = MODEL_ALIASES.get(name, name)
    config_class, presets, default, _ = trainer(name)
    if (preset or default) not in presets:
        raise MnnError(f"--preset {preset}: {name} has the presets {', '.join(presets)}")
    config = config_class(**presets[preset or default])
    if name in ("mlp", "cnn"):
        from mnn.train.classifier import build_classifier  # noqa: PLC0415

        images = numpy.zeros((1, 784) if name == "mlp" else (1, 1, 28, 28))  # Fashion-MNIST's and MNIST's size
        return build_classifier(config, images), dataclasses.asdict(config)
    from mnn.train.language_model import build_language_model  # noqa: PLC0415

    return build_language_model(config, 65), dataclasses.asdict(config)  # tiny Shakespeare's 65 characters


def batch_shape(model, options: dict, batch_size) -> tuple:
    """A training batch's shape for ``model``: ``(B, T)`` ids, ``(B, in_features)`` or ``(B, C, H, W)`` images."""
    config = model.config if isinstance(model.config, dict) else {"block_size": model.config.block_size}
    B = batch_size or options.get("batch_size") or 12  # 12: the language models' default batch
    if hasattr(model, "check_ids"):
        return B, int(options.get("block_size") or config.get("block_size") or 64)
    if "in_features" in config:
        return B, int(config["in_features"])
    return B, int(config["in_channels"]), int(config["image_size"]), int(config["image_size"])


def summary(args) -> int:
    """A model's parameters, matrix-product FLOPs per pass and cached bytes (:func:`mnn.summary.summary`)."""
    from mnn.summary import summary as account  # noqa: PLC0415

    if args.weights is not None:
        if args.preset is not None:
            raise MnnError("--preset goes with --model: a saved model has its own shape")
        model, metadata, path = load(args.weights)
        options = run_settings(metadata, path)
    else:
        model, options = preset_model(args.model, args.preset)
    result = account(model, batch_shape(model, options, args.batch_size))
    print(result.to_json() if args.json else result.table())
    return 0
