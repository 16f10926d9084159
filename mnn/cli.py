"""The ``mnn`` command: ``mnn train mlp|gpt``, ``mnn eval``, ``mnn sample``.

Every error a user can cause ends in one line on stderr and exit status 2,
never a traceback. Ctrl-C or SIGTERM during training saves a checkpoint and
exits 0 with the command that resumes the run (``--resume DIR``).
"""

from __future__ import annotations

import argparse
import sys

from mnn import backend
from mnn.errors import MnnError


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``mnn: error: ...``."""

    def error(self, message: str):
        self.exit(2, f"mnn: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


# argparse names the type in its message ("invalid positive_int value"); say it plainly.
positive_int.__name__ = "positive integer"
positive_float.__name__ = "positive number"
non_negative_float.__name__ = "non-negative number"
non_negative_int.__name__ = "non-negative integer"
probability.__name__ = "probability"


def add_mlp_parser(train) -> None:
    from mnn.train.classifier import PRESETS  # noqa: PLC0415

    mlp = train.add_parser("mlp", help="an MLP classifier on Fashion-MNIST or MNIST")
    mlp.add_argument("--preset", choices=sorted(PRESETS),
                     help="a named recipe (default: 'default'); other flags override it")
    mlp.add_argument("--dataset", choices=["fashion-mnist", "mnist"])
    mlp.add_argument("--data-dir", help="folder with the four IDX files (default: found or downloaded)")
    mlp.add_argument("--hidden", type=positive_int, nargs="+", help="hidden layer sizes, e.g. --hidden 512 256")
    mlp.add_argument("--activation", choices=["relu", "tanh", "sigmoid"])
    mlp.add_argument("--dropout", type=probability)
    mlp.add_argument("--epochs", type=positive_int)
    mlp.add_argument("--batch-size", type=positive_int)
    mlp.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    mlp.add_argument("--lr", type=positive_float)
    mlp.add_argument("--weight-decay", type=non_negative_float)
    mlp.add_argument("--schedule", choices=["constant", "cosine"])
    mlp.add_argument("--seed", type=non_negative_int)
    mlp.add_argument("--log-interval", type=positive_int)
    mlp.add_argument("--out", help="output folder (default runs/mlp)")
    add_checkpoint_options(mlp, "mlp", "after every epoch")


def add_gpt_parser(train) -> None:
    from mnn.train.language_model import PRESETS  # noqa: PLC0415

    gpt = train.add_parser("gpt", help="a character-level GPT on a text file (default: tiny Shakespeare)")
    gpt.add_argument("--preset", choices=sorted(PRESETS),
                     help="a named recipe (default: shakespeare-char-cpu); other flags override it")
    gpt.add_argument("--data", help="a UTF-8 text file (default: tiny Shakespeare, downloaded and checked)")
    gpt.add_argument("--out", help="output folder (default runs/gpt)")
    for flag in ("block-size", "n-layer", "n-head", "n-embd", "batch-size", "max-iters",
                 "warmup-iters", "lr-decay-iters", "eval-interval", "eval-iters", "log-interval"):
        gpt.add_argument(f"--{flag}", type=positive_int)
    for flag in ("learning-rate", "min-lr", "grad-clip"):
        gpt.add_argument(f"--{flag}", type=positive_float)
    gpt.add_argument("--weight-decay", type=non_negative_float)
    gpt.add_argument("--dropout", type=probability)
    gpt.add_argument("--seed", type=non_negative_int)
    gpt.add_argument("--replicas", type=positive_int,
                     help="slices of each batch trained at once, one thread each (default 2; see mnn.parallel)")
    add_checkpoint_options(gpt, "gpt", "after every evaluation")


def add_checkpoint_options(parser, model: str, when: str) -> None:
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run saved in DIR (its checkpoint.safetensors) with its options; "
                             "options given again override them (e.g. a larger --max-iters)")
    parser.add_argument("--checkpoint-interval", type=positive_int, metavar="STEPS",
                        help=f"also save a checkpoint every STEPS steps (one is always saved {when}, "
                             f"and on Ctrl-C or SIGTERM)")
    parser.add_argument("--skip-nonfinite", action="store_true", default=None,
                        help="skip a step whose loss or gradient is NaN or infinite instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mnn", description="Manual Neural Networks: train and use hand-derived models.")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None, help="cpu (numpy) or gpu (CuPy)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="train a model").add_subparsers(
        dest="model", required=True, parser_class=OneLineParser)
    add_mlp_parser(train)
    add_gpt_parser(train)

    evaluate = commands.add_parser("eval", help="test accuracy of a saved MLP")
    evaluate.add_argument("weights", help="a model.safetensors written by 'mnn train mlp'")
    evaluate.add_argument("--data-dir", help="folder with the four IDX files")

    sample = commands.add_parser("sample", help="generate text from a saved character-level GPT")
    sample.add_argument("weights", help="a model.safetensors written by 'mnn train gpt'")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument("--tokens", type=positive_int, default=500, help="characters to generate")
    sample.add_argument("--temperature", type=positive_float, default=0.8)
    sample.add_argument("--top-k", type=positive_int, default=40)
    sample.add_argument("--seed", type=int, default=1)
    return parser


def overrides(args, config_class) -> dict:
    """The options given on the command line that name a field of ``config_class``."""
    fields = config_class.__dataclass_fields__
    return {key: value for key, value in vars(args).items() if key in fields and value is not None}


# Options a resumed run cannot change: the model's shape, the data and the batch order.
FIXED_ON_RESUME = {
    "mlp": ("dataset", "hidden", "activation", "dropout", "batch_size", "optimizer", "seed"),
    "gpt": ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "batch_size", "seed"),
}


def train_config(args, config_class, presets: dict, default_preset: str):
    """The run's options: a preset plus the flags given, or, with ``--resume``, the saved ones plus the flags."""
    given = overrides(args, config_class)
    if args.resume is None:
        return config_class(**{**presets[args.preset or default_preset], **given}), None
    if args.preset is not None:
        raise MnnError("--preset cannot be combined with --resume: the run keeps its own options "
                       "(give single options to change them)")
    from mnn.io.checkpoint import resume_config  # noqa: PLC0415

    return resume_config(args.resume, config_class, given, FIXED_ON_RESUME[args.model], args.model), args.resume


def run(args) -> int:
    if args.command == "train" and args.model == "mlp":
        from mnn.train.classifier import PRESETS, MLPTrainConfig, train_mlp  # noqa: PLC0415

        config, resume = train_config(args, MLPTrainConfig, PRESETS, "default")
        train_mlp(config, resume=resume)
        return 0
    if args.command == "train" and args.model == "gpt":
        from mnn.train.language_model import PRESETS, GPTTrainConfig, train_gpt  # noqa: PLC0415

        config, resume = train_config(args, GPTTrainConfig, PRESETS, "shakespeare-char-cpu")
        train_gpt(config, resume=resume)
        return 0
    if args.command == "sample":
        from mnn.train.language_model import sample_file  # noqa: PLC0415

        print(sample_file(args.weights, args.prompt, args.tokens, args.temperature, args.top_k, args.seed))
        return 0
    if args.command == "eval":
        from mnn.train.classifier import evaluate_file  # noqa: PLC0415

        print(f"test_acc {evaluate_file(args.weights, args.data_dir):.4f}")
        return 0
    raise AssertionError(f"unhandled command {args}")  # pragma: no cover - argparse enforces the choices


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.device:
            backend.use(args.device)
        return run(args)
    except (MnnError, ValueError, OSError, RuntimeError) as error:
        print(f"mnn: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
