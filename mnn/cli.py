"""The ``mnn`` command: ``mnn train mlp|cnn|gpt|char-rnn``, ``mnn eval``, ``mnn sample``, ``mnn export``, ``mnn import``,
``mnn exercise`` (:mod:`mnn.exercises`).

Every error a user can cause ends in one line on stderr and exit status 2,
never a traceback. Ctrl-C or SIGTERM during training saves a checkpoint and
exits 0 with the command that resumes the run (``--resume DIR``). The
commands that read a model are in :mod:`mnn._commands`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
import textwrap
from pathlib import Path

from mnn import __version__, backend
from mnn.errors import MnnError

FORMATTER = argparse.RawDescriptionHelpFormatter


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that names the option first: ``mnn: error: --seed: ...``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", FORMATTER)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        named = re.match(r"argument ([^:]+): (.*)", message, re.S)
        if named:
            option = named.group(1).split("/")[-1]  # "-h/--help" -> "--help"
            message = f"{option if option.startswith('-') else self.prog}: {named.group(2)}"
        self.exit(2, f"mnn: error: {message}\n")


DEVICE_HELP = ("cpu (numpy), gpu (CuPy) or strict (numpy behind CuPy's rules: an implicit host copy is an error) "
               "(default: $MNN_DEVICE, else cpu)")


def checked(kind: str, convert, accept):
    """An argparse type: ``convert`` the text, keep it if ``accept(value)``, else "expected a KIND, got TEXT"."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text}")
        return value
    return parse


INF = float("inf")
positive_int = checked("a positive integer", int, lambda v: v >= 1)
non_negative_int = checked("a non-negative integer", int, lambda v: v >= 0)
positive_float = checked("a positive number", float, lambda v: 0 < v < INF)
non_negative_float = checked("a non-negative number", float, lambda v: 0 <= v < INF)
probability = checked("a probability in [0, 1)", float, lambda v: 0 <= v < 1)


def text_file(text: str) -> str:
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a text file")
    return text


def folder(text: str) -> str:
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder (give the folder that holds the four "
                                         "IDX files)")
    return text


SWITCH = "switch"  # an option without a value (store_true)


def shown(value) -> str:
    """A default as the user would type it."""
    if isinstance(value, list):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def preset_defaults(config_class, presets: dict, default_preset: str) -> dict:
    """Every option's value when none is given: the config's defaults, then the default preset's."""
    base = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(config_class)}
    return {**base, **presets[default_preset]}


def presets_epilog(presets: dict, default_preset: str) -> str:
    lines = ["presets (--preset NAME sets these options; options given as well override them):"]
    for name, settings in presets.items():
        listed = ", ".join(f"{key}={value}" for key, value in settings.items()) or "the defaults above"
        label = f"{name} (default)" if name == default_preset else name
        lines.append(textwrap.fill(f"{label}: {listed}", 100, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines)


def add_options(parser, options: list, defaults: dict, default_preset: str) -> None:
    """``(flag, type, help)`` rows, each help ending with its default (the default preset's value)."""
    for flag, kind, text in options:
        name = flag[2:].replace("-", "_")
        value = defaults.get(name)
        extra = ({"choices": kind} if isinstance(kind, list) else {"action": "store_true", "default": None}
                 if kind == SWITCH else {"type": kind})
        if name == "channels" or (name == "hidden" and options is MLP_OPTIONS):
            extra["nargs"] = "+"
        note = f" (default: {shown(value)}, from preset {default_preset})" if value is not None else ""
        parser.add_argument(flag, help=text + note, **extra)


def device_options() -> argparse.ArgumentParser:
    """``--device``, accepted before the command and after it (on every subcommand)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--device", choices=["cpu", "gpu", "strict"], default=argparse.SUPPRESS,
                        help=DEVICE_HELP)
    return parent


MLP_OPTIONS = [
    ("--dataset", ["fashion-mnist", "mnist"], "the images"),
    ("--data-dir", folder, "folder with the four IDX files (if not given: found in the cache or downloaded)"),
    ("--hidden", positive_int, "hidden layer sizes, e.g. --hidden 512 256"),
    ("--activation", ["relu", "tanh", "sigmoid"], "the hidden layers' activation"),
    ("--dropout", probability, "dropout after each hidden layer"),
    ("--epochs", positive_int, "passes over the training images"),
    ("--batch-size", positive_int, "images per step"),
    ("--optimizer", ["sgd", "adam", "adamw"], "the update rule"),
    ("--lr", positive_float, "learning rate (the peak, with a schedule)"),
    ("--weight-decay", non_negative_float, "weight decay"),
    ("--schedule", ["constant", "cosine"], "learning-rate schedule"),
    ("--seed", non_negative_int, "seed of the initial weights, the batch order and dropout"),
    ("--log-interval", positive_int, "steps between log lines"),
    ("--out", str, "output folder"),
    ("--grad-accum", positive_int, "micro-batches added up into each step (per rank under mpiexec)"),
]

CNN_OPTIONS = [row for row in MLP_OPTIONS if row[0] not in ("--hidden", "--activation", "--dropout")] + [
    ("--channels", positive_int, "output channels of each conv-BN-ReLU-pool block, e.g. --channels 32 64"),
    ("--hidden", positive_int, "width of the hidden Linear layer"),
    ("--dropout", probability, "dropout before the last Linear layer"),
    ("--augment", SWITCH, "random shifts (2 pixels) and horizontal flips of the training images"),
]

GPT_OPTIONS = [
    ("--data", text_file, "a UTF-8 text file (if not given: tiny Shakespeare, downloaded and checked)"),
    ("--out", str, "output folder"),
    ("--block-size", positive_int, "context length in characters"),
    ("--n-layer", positive_int, "transformer blocks"),
    ("--n-head", positive_int, "attention heads (must divide --n-embd)"),
    ("--n-embd", positive_int, "embedding width"),
    ("--batch-size", positive_int, "windows per step"),
    ("--max-iters", positive_int, "training iterations"),
    ("--warmup-iters", positive_int, "iterations of linear learning-rate warm-up"),
    ("--lr-decay-iters", positive_int, "iteration where the cosine decay ends (if not given: --max-iters)"),
    ("--eval-interval", positive_int, "iterations between evaluations (and checkpoints)"),
    ("--eval-iters", positive_int, "batches per split in each evaluation"),
    ("--log-interval", positive_int, "iterations between log lines"),
    ("--learning-rate", positive_float, "peak learning rate"),
    ("--min-lr", positive_float, "learning rate at the end of the decay"),
    ("--grad-clip", positive_float, "clip the global gradient norm to this"),
    ("--weight-decay", non_negative_float, "AdamW weight decay on the matrices"),
    ("--dropout", probability, "dropout probability"),
    ("--seed", non_negative_int, "seed of the initial weights, batches and dropout"),
    ("--replicas", positive_int, "slices of each batch trained at once, one process (or thread) each: mnn.parallel"),
    ("--grad-accum", positive_int, "micro-batches added up into each iteration (per rank under mpiexec)"),
    ("--dtype", ["float32", "bf16", "fp16"], "precision of the matrix products, float32 weights (see mnn.precision)"),
]


CHAR_RNN_OPTIONS = [row for row in GPT_OPTIONS if row[0] not in ("--n-layer", "--n-head", "--n-embd", "--dtype")] + [
    ("--cell", ["lstm", "gru", "rnn"], "the recurrent layer"),
    ("--n-embd", positive_int, "character embedding width"),
    ("--hidden-size", positive_int, "width of each recurrent layer"),
    ("--num-layers", positive_int, "recurrent layers stacked"),
]

# mnn train MODEL: (module, config class, presets, default preset, options, help, options fixed on resume)
TRAINERS = {
    "mlp": ("classifier", "MLPTrainConfig", "PRESETS", "default", MLP_OPTIONS,
            "an MLP classifier on Fashion-MNIST or MNIST",
            ("dataset", "hidden", "activation", "dropout", "batch_size", "optimizer", "seed", "grad_accum")),
    "cnn": ("classifier", "CNNTrainConfig", "CNN_PRESETS", "default", CNN_OPTIONS,
            "a convolutional classifier on Fashion-MNIST or MNIST",
            ("dataset", "channels", "hidden", "dropout", "batch_size", "optimizer", "seed", "grad_accum")),
    "gpt": ("language_model", "GPTTrainConfig", "PRESETS", "shakespeare-char-cpu", GPT_OPTIONS,
            "a character-level GPT on a text file (default: tiny Shakespeare)",
            ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "batch_size", "seed", "grad_accum")),
    "char-rnn": ("language_model", "CharRNNTrainConfig", "CHAR_RNN_PRESETS", "shakespeare-char-cpu",
                 CHAR_RNN_OPTIONS, "a character-level LSTM, GRU or RNN (char-rnn) on a text file (alias: lstm)",
                 ("cell", "n_embd", "hidden_size", "num_layers", "dropout", "batch_size", "seed", "grad_accum")),
}
MODEL_ALIASES = {"lstm": "char-rnn"}


def trainer(model: str):
    """``(config class, presets, default preset, train function)`` of ``mnn train MODEL``."""
    module_name, config_name, presets_name, default = TRAINERS[model][:4]
    module = importlib.import_module(f"mnn.train.{module_name}")
    train = module.train_classifier if module_name == "classifier" else module.train_language_model
    return getattr(module, config_name), getattr(module, presets_name), default, train


def add_train_parser(train, model: str, devices) -> None:
    config_class, presets, default, _ = trainer(model)
    options, help_text = TRAINERS[model][4:6]
    aliases = [alias for alias, name in MODEL_ALIASES.items() if name == model]
    parser = train.add_parser(model, help=help_text, description=help_text, parents=[devices], aliases=aliases,
                              epilog=presets_epilog(presets, default))
    parser.add_argument("--preset", choices=list(presets),
                        help=f"a named recipe, listed below (default: {default}); options given override it")
    add_options(parser, options, preset_defaults(config_class, presets, default), default)
    when = "after every epoch" if TRAINERS[model][0] == "classifier" else "after every evaluation"
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run saved in DIR (its checkpoint.safetensors) with its options; "
                             "options given again override them (e.g. a larger --max-iters)")
    parser.add_argument("--checkpoint-interval", type=positive_int, metavar="STEPS",
                        help=f"also save a checkpoint every STEPS steps (default: none; one is always saved "
                             f"{when}, and on Ctrl-C or SIGTERM)")
    parser.add_argument("--skip-nonfinite", action="store_true", default=None,
                        help="skip a step whose loss or gradient is NaN or infinite instead of stopping "
                             "(default: stop)")


MODEL_HELP = "a weights file, a checkpoint.safetensors, or a run folder (its model.safetensors)"


def build_parser() -> argparse.ArgumentParser:
    devices = device_options()
    parser = OneLineParser(prog="mnn", description="Manual Neural Networks: train and use hand-derived models.")
    parser.add_argument("--version", action="version", version=f"mnn {__version__}")
    parser.add_argument("--device", choices=["cpu", "gpu", "strict"], default=None, help=DEVICE_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser,
                                     title="commands (mnn COMMAND --help for each one's options)")

    train = commands.add_parser("train", help="train a model", description="Train a model.")
    models = train.add_subparsers(dest="model", metavar="MODEL", parser_class=OneLineParser, title="models")
    for model in TRAINERS:
        add_train_parser(models, model, devices)

    evaluate = commands.add_parser("eval", parents=[devices], help="test accuracy of an MLP, val loss of a GPT",
                                   description="An MLP: its test accuracy. A GPT: its loss and perplexity on the "
                                               "val split (the last 10%%) of its text, over every window.")
    evaluate.add_argument("weights", metavar="MODEL", help=MODEL_HELP)
    evaluate.add_argument("--data-dir", type=folder, help="an MLP's folder with the four IDX files "
                                                          "(default: found in the cache or downloaded)")
    evaluate.add_argument("--data", type=text_file, help="a GPT's text file (default: the run's --data, else "
                                                         "tiny Shakespeare)")

    sample = commands.add_parser("sample", parents=[devices], help="generate text from a character-level GPT",
                                 description="Generate text from a character-level GPT; the text goes to stdout.")
    sample.add_argument("weights", metavar="MODEL", help=MODEL_HELP)
    prompt = sample.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    prompt.add_argument("--prompt-file", metavar="PATH", help="read the prompt from PATH ('-': standard input)")
    sample.add_argument("--tokens", type=positive_int, default=500, help="characters to generate (default: 500)")
    sample.add_argument("--num-samples", type=positive_int, default=1,
                        help="samples to draw, separated by a line of dashes (default: 1)")
    sample.add_argument("--temperature", type=positive_float, default=0.8, help="(default: 0.8)")
    sample.add_argument("--top-k", type=positive_int, default=40, help="draw among the k likeliest (default: 40)")
    sample.add_argument("--seed", type=non_negative_int, default=1, help="(default: 1)")
    sample.add_argument("--out", metavar="FILE", help="write the text to FILE (default: standard output)")

    export = commands.add_parser("export", parents=[devices], help="write a GPT for PyTorch (nanoGPT names)",
                                 description="Write an mnn GPT as nanoGPT's state dict in safetensors, with the "
                                             "character vocabulary in its metadata ('vocab').")
    export.add_argument("weights", metavar="FILE", help=MODEL_HELP)
    export.add_argument("--to", choices=["pytorch"], required=True, help="the format (nanoGPT's names)")
    export.add_argument("out", metavar="OUT", help="the safetensors file to write")
    export.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="(default: float32)")

    imports = commands.add_parser("import", parents=[devices], help="read a nanoGPT safetensors into mnn weights",
                                  description="Build mnn weights from a nanoGPT state dict saved as safetensors.")
    imports.add_argument("weights", metavar="FILE", help="a nanoGPT state dict in safetensors")
    imports.add_argument("out", metavar="OUT", help="the mnn weights file to write")
    imports.add_argument("--n-head", type=positive_int,
                         help="attention heads (default: from the file's config; a plain state dict has none)")
    imports.add_argument("--vocab-text", type=text_file, metavar="FILE",
                         help="the text the model was trained on: its sorted characters are the vocabulary "
                              "(default: the file's 'vocab' metadata)")

    accounting = commands.add_parser(
        "summary", parents=[devices], help="parameters, FLOPs and cached bytes of a model, layer by layer",
        description="Count, layer by layer, a model's parameters, the matrix-product FLOPs of one forward and one "
                    "backward pass (from each layer's own equations) and the bytes its cache keeps for backward, "
                    "at one batch shape (mnn.summary).")
    which = accounting.add_mutually_exclusive_group(required=True)
    which.add_argument("weights", metavar="MODEL", nargs="?", help=MODEL_HELP)
    which.add_argument("--model", choices=[*TRAINERS, *MODEL_ALIASES], help="an untrained model built from a preset")
    accounting.add_argument("--preset", help="the --model's training preset (default: mnn train's default)")
    accounting.add_argument("--batch-size", type=positive_int,
                            help="the batch (default: the run's, else the preset's); T is the block size")
    accounting.add_argument("--json", action="store_true", help="print JSON: totals at the top, then the layers")
    from mnn.exercises._command import add_exercise_parser  # noqa: PLC0415

    add_exercise_parser(commands)
    parser.subcommand_parsers = {"": parser, "train": train}
    return parser


def overrides(args, config_class) -> dict:
    """The options given on the command line that name a field of ``config_class`` (its saved options)."""
    fields = {field.name for field in dataclasses.fields(config_class)}
    return {key: value for key, value in vars(args).items() if key in fields and value is not None}


def train_config(args, config_class, presets: dict, default_preset: str):
    """The run's options: a preset plus the flags given, or, with ``--resume``, the saved ones plus the flags."""
    given = overrides(args, config_class)
    if args.resume is None:
        return config_class(**{**presets[args.preset or default_preset], **given}), None
    if args.preset is not None:
        raise MnnError("--preset cannot be combined with --resume: the run keeps its own options "
                       "(give single options to change them)")
    from mnn.io.checkpoint import resume_config  # noqa: PLC0415

    return resume_config(args.resume, config_class, given, TRAINERS[args.model][6], args.model), args.resume


def run(args) -> int:
    if args.command == "train":
        args.model = MODEL_ALIASES.get(args.model, args.model)
        config_class, presets, default, train = trainer(args.model)
        config, resume = train_config(args, config_class, presets, default)
        from mnn import distributed  # noqa: PLC0415 - starts MPI under mpiexec with several ranks

        distributed.fit_replicas(config, getattr(args, "replicas", None) is not None, distributed.world())
        train(config, resume=resume)
        return 0
    if args.command == "exercise":
        from mnn.exercises._command import run_exercise  # noqa: PLC0415

        return run_exercise(args)
    from mnn import _commands  # noqa: PLC0415

    return getattr(_commands, args.command if args.command != "import" else "import_")(args)


def select_device(args) -> None:
    """``--device`` (before or after the command) wins; else ``MNN_DEVICE``, whose problem is said here."""
    if getattr(args, "device", None):
        try:
            backend.use(args.device)
        except (ValueError, RuntimeError) as error:
            raise MnnError(f"--device {args.device}: {error}") from None
    elif backend._environment_problem is not None:  # noqa: SLF001 - the CLI reports what the import kept
        raise MnnError(backend._environment_problem)  # noqa: SLF001


def end_job(error: BaseException, traceback: bool = False) -> None:
    """With several MPI ranks: report ``error`` in one line and end every rank (:meth:`mnn.distributed.World.fail`)."""
    from mnn import distributed  # noqa: PLC0415

    if distributed.active():
        if traceback:
            import traceback as tb  # noqa: PLC0415

            tb.print_exc()
        distributed.world().fail(str(error) or type(error).__name__)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = "command" if args.command is None else "model" if args.command == "train" and not args.model else ""
    if missing:
        sub = parser.subcommand_parsers["" if missing == "command" else "train"]
        choices = "train, eval, sample, export, import, exercise" if missing == "command" else ", ".join(TRAINERS)
        sys.stderr.write(sub.format_help())
        print(f"mnn: error: {sub.prog}: give a {missing.upper()}: one of {choices}", file=sys.stderr)
        return 2
    try:
        select_device(args)
        return run(args)
    except (MnnError, ValueError, OSError, RuntimeError) as error:
        end_job(error)
        print(f"mnn: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        end_job(KeyboardInterrupt("interrupted"))
        print("mnn: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # under mpiexec: one rank's bug must not leave the others waiting forever
        end_job(error, traceback=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
