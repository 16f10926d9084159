"""The ``mnn`` command: ``mnn train mlp|gpt``, ``mnn eval``, ``mnn sample``.

Every error a user can cause ends in one line on stderr and exit status 2,
never a traceback.
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


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


# argparse names the type in its message ("invalid positive_int value"); say it plainly.
positive_int.__name__ = "positive integer"
positive_float.__name__ = "positive number"
probability.__name__ = "probability"


def add_mlp_parser(train) -> None:
    from mnn.train_mlp import PRESETS  # noqa: PLC0415

    mlp = train.add_parser("mlp", help="an MLP classifier on Fashion-MNIST or MNIST")
    mlp.add_argument("--preset", choices=sorted(PRESETS), default="default",
                     help="a named recipe; other flags override it")
    mlp.add_argument("--dataset", choices=["fashion-mnist", "mnist"])
    mlp.add_argument("--data-dir", help="folder with the four IDX files (default: found or downloaded)")
    mlp.add_argument("--hidden", type=positive_int, nargs="+", help="hidden layer sizes, e.g. --hidden 512 256")
    mlp.add_argument("--activation", choices=["relu", "tanh", "sigmoid"])
    mlp.add_argument("--dropout", type=probability)
    mlp.add_argument("--epochs", type=positive_int)
    mlp.add_argument("--batch-size", type=positive_int)
    mlp.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    mlp.add_argument("--lr", type=positive_float)
    mlp.add_argument("--weight-decay", type=float)
    mlp.add_argument("--schedule", choices=["constant", "cosine"])
    mlp.add_argument("--seed", type=int)
    mlp.add_argument("--log-interval", type=positive_int)
    mlp.add_argument("--out", help="output folder (default runs/mlp)")


def add_gpt_parser(train) -> None:
    from mnn.train_gpt import PRESETS  # noqa: PLC0415

    gpt = train.add_parser("gpt", help="a character-level GPT on a text file (default: tiny Shakespeare)")
    gpt.add_argument("--preset", choices=sorted(PRESETS), default="shakespeare-char-cpu",
                     help="a named recipe; other flags override it")
    gpt.add_argument("--data", help="a UTF-8 text file (default: tiny Shakespeare, downloaded and checked)")
    gpt.add_argument("--out", help="output folder (default runs/gpt)")
    for flag in ("block-size", "n-layer", "n-head", "n-embd", "batch-size", "max-iters",
                 "warmup-iters", "lr-decay-iters", "eval-interval", "eval-iters", "log-interval"):
        gpt.add_argument(f"--{flag}", type=positive_int)
    for flag in ("learning-rate", "min-lr", "grad-clip"):
        gpt.add_argument(f"--{flag}", type=positive_float)
    gpt.add_argument("--weight-decay", type=float)
    gpt.add_argument("--dropout", type=probability)
    gpt.add_argument("--seed", type=int)


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


def run(args) -> int:
    if args.command == "train" and args.model == "mlp":
        from mnn.train_mlp import PRESETS, MLPTrainConfig, train_mlp  # noqa: PLC0415

        config = MLPTrainConfig(**{**PRESETS[args.preset], **overrides(args, MLPTrainConfig)})
        train_mlp(config)
        return 0
    if args.command == "train" and args.model == "gpt":
        from mnn.train_gpt import PRESETS, GPTTrainConfig, train_gpt  # noqa: PLC0415

        train_gpt(GPTTrainConfig(**{**PRESETS[args.preset], **overrides(args, GPTTrainConfig)}))
        return 0
    if args.command == "sample":
        from mnn.train_gpt import sample_file  # noqa: PLC0415

        print(sample_file(args.weights, args.prompt, args.tokens, args.temperature, args.top_k, args.seed))
        return 0
    if args.command == "eval":
        from mnn.train_mlp import evaluate_file  # noqa: PLC0415

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
