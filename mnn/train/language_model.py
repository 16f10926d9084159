"""Character language models: a GPT (nanoGPT's recipe) trained by :mod:`mnn.train.loop`, and sampled."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy

from mnn import precision
from mnn.backend import asarray, xp
from mnn.data import (
    CharTokenizer,
    load_text,
    random_windows,
    split_train_val,
    tiny_shakespeare_path,
)
from mnn.distributed import world
from mnn.errors import CheckpointError, DataError
from mnn.io import WEIGHTS_NAME, load_model, save_model
from mnn.io.checkpoint import finite_or_none, model_generators
from mnn.losses import CrossEntropyLoss
from mnn.models import GPT, CharRNN, GPTConfig
from mnn.optim import AdamW, WarmupCosine, clip_grad_norm, param_groups
from mnn.parallel import DataParallel
from mnn.throughput import speed
from mnn.train.loop import run
from mnn.train.reporting import log


@dataclass
class LanguageModelTrainConfig:
    """The options every character language model's run has; field names follow nanoGPT's ``train.py``."""

    data: str | None = None
    out: str = "runs/gpt"
    block_size: int = 64  # the window length T (the GPT's context; the span of backpropagation through time)
    dropout: float = 0.0
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 50
    seed: int = 1337
    checkpoint_interval: int | None = None  # iterations between extra checkpoints (one is saved at every eval)
    skip_nonfinite: bool = False  # skip a step whose loss or gradient norm is NaN/inf instead of stopping
    replicas: int = 2  # slices of each batch run at once, in processes or threads (mnn.parallel); 1 on a GPU
    grad_accum: int = 1  # micro-steps whose gradients add up to one step (nanoGPT's gradient_accumulation_steps)
    dtype: str = "float32"  # the matrix products' precision: float32, bf16 or fp16 (mnn.precision; weights stay float32)


@dataclass
class GPTTrainConfig(LanguageModelTrainConfig):
    """One GPT run: the shared options and the Transformer's shape."""

    model: ClassVar[str] = "gpt"  # the registry name of the model it trains (not a saved option)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = False  # nanoGPT train.py: no biases in Linear and LayerNorm


@dataclass
class CharRNNTrainConfig(LanguageModelTrainConfig):
    """One char-rnn run (an LSTM, GRU or RNN stack): the shared options and the stack's shape."""

    model: ClassVar[str] = "char-rnn"
    out: str = "runs/lstm"
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    cell: str = "lstm"
    n_embd: int = 64
    hidden_size: int = 256
    num_layers: int = 2


CHAR_RNN_PRESETS = {
    # The GPT CPU recipe's budget: about its parameter count (0.88M against 0.80M) and its data per step.
    "shakespeare-char-cpu": {},
    # The same network trained longer, with dropout between and after the layers.
    "shakespeare-char-long": {"max_iters": 5000, "dropout": 0.1, "eval_interval": 500},
}

PRESETS = {
    # nanoGPT's README recipe for a CPU: val about 1.88 after 2000 iterations.
    "shakespeare-char-cpu": {"block_size": 64, "batch_size": 12, "n_layer": 4, "n_head": 4, "n_embd": 128,
                             "max_iters": 2000, "dropout": 0.0, "learning_rate": 1e-3, "min_lr": 1e-4,
                             "warmup_iters": 100},
    # The same model trained twice as long, evaluated half as often: mnn's answer to PyTorch's 2000 iterations
    # in the same wall time (python -m benchmarks.recipe --mnn-preset shakespeare-char-cpu-fast measures both).
    "shakespeare-char-cpu-fast": {"block_size": 64, "batch_size": 12, "n_layer": 4, "n_head": 4, "n_embd": 128,
                                  "max_iters": 4000, "dropout": 0.0, "learning_rate": 1e-3, "min_lr": 1e-4,
                                  "warmup_iters": 100, "eval_interval": 500},
    # nanoGPT's config/train_shakespeare_char.py (the GPU run: val about 1.47).
    "shakespeare-char": {"block_size": 256, "batch_size": 64, "n_layer": 6, "n_head": 6, "n_embd": 384,
                         "max_iters": 5000, "dropout": 0.2, "learning_rate": 1e-3, "min_lr": 1e-4,
                         "warmup_iters": 100},
}


def prepare_text(path) -> tuple[CharTokenizer, numpy.ndarray, numpy.ndarray]:
    """Read the text, build the character vocabulary, and split the ids 90/10 into train and val."""
    text = load_text(path)
    tokenizer = CharTokenizer.from_text(text)
    train_ids, val_ids = split_train_val(tokenizer.encode(text), 0.9)
    return tokenizer, train_ids, val_ids


# Evaluation batches are stacked up to this many windows per forward pass (shared out among the replicas).
# Measured on nanoGPT's CPU config, 2 replicas: 1.5 ms per window at 24-48 windows, 1.8 at 120 (the
# activations of a 24-window slice, 1.5k rows of 512 floats, stay in a core's L2 cache; larger ones do not).
EVAL_WINDOWS_PER_FORWARD = 48


def estimate_loss(parallel: DataParallel, splits: dict, config: GPTTrainConfig, rng) -> dict:
    """Mean loss over ``eval_iters`` random batches of each split, in evaluation mode.

    The batches are drawn one by one, exactly as nanoGPT draws them, then
    stacked so that each forward pass sees up to ``EVAL_WINDOWS_PER_FORWARD``
    windows: larger matrix products and fewer Python calls for the same
    estimate (every window has the same number of tokens, so the mean over the
    stacked windows is the mean of the per-batch means). The stacked windows
    are shared out among the replicas of ``parallel``.
    """
    parallel.train(False)
    losses = {}
    per_forward = max(1, EVAL_WINDOWS_PER_FORWARD // config.batch_size)
    for name, ids in splits.items():
        batches = [random_windows(ids, config.block_size, config.batch_size, rng) for _ in range(config.eval_iters)]
        total = 0.0
        for start in range(0, len(batches), per_forward):
            chunk = batches[start:start + per_forward]
            x = numpy.concatenate([x for x, _ in chunk])
            y = numpy.concatenate([y for _, y in chunk])
            total += parallel.evaluate(asarray(x), asarray(y)) * len(chunk)
        losses[name] = total / config.eval_iters
    parallel.train(True)
    return losses


def check_config(config) -> None:
    """Refuse impossible options before any data is read (the CLI checks types; this checks combinations)."""
    for name in ("block_size", "n_layer", "n_head", "n_embd", "hidden_size", "num_layers", "batch_size", "max_iters",
                 "eval_interval", "eval_iters", "log_interval", "grad_accum"):
        value = getattr(config, name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.model == "gpt" and config.n_embd % config.n_head:
        raise ValueError(f"n_embd {config.n_embd} must be divisible by n_head {config.n_head}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
    if not isinstance(config.replicas, int) or isinstance(config.replicas, bool) or config.replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {config.replicas!r}")
    if config.dtype not in precision.NAMES:
        raise ValueError(f"dtype must be one of {', '.join(precision.NAMES)}, got {config.dtype!r}")


def build_language_model(config, vocab_size: int):
    """The model ``config.model`` names, for a vocabulary of ``vocab_size`` characters."""
    if config.model == "char-rnn":
        return CharRNN(vocab_size, config.n_embd, config.hidden_size, config.num_layers, config.cell,
                       config.dropout, config.seed)
    model_config = GPTConfig(block_size=config.block_size, vocab_size=vocab_size, n_layer=config.n_layer,
                             n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout, bias=config.bias)
    return GPT(model_config, seed=config.seed)


class LanguageModelTask:
    """What is particular to training a character language model; :func:`mnn.train.loop.run` does the rest.

    One step is one batch of random windows of the training text (drawn from
    the ``batch`` generator), split among ``replicas`` threads
    (:mod:`mnn.parallel`); the gradients are clipped to ``grad_clip``. Every
    ``eval_interval`` steps (and at the end) the loss is estimated on both
    splits, and the weights with the best validation loss so far are saved in
    ``model.safetensors`` (nanoGPT's ``ckpt.pt``); the checkpoint holds the
    latest weights.
    """

    length_option = "a larger --max-iters"
    step_base = 0  # messages name iterations from 0, as nanoGPT
    evaluation_name = "loss"
    plot_series = ["loss", "train", "val"]
    shared_generators = ("batch", "eval")  # equal on every rank: each draws the global batch and takes its slice

    def __init__(self, config: GPTTrainConfig) -> None:
        check_config(config)
        self.tokenizer, self.train_ids, self.val_ids = prepare_text(tiny_shakespeare_path(config.data))
        for name, ids in [("train", self.train_ids), ("val", self.val_ids)]:
            if len(ids) <= config.block_size:
                raise DataError(f"the {name} split has {len(ids)} characters, not more than block_size "
                                f"{config.block_size}: use a longer text or a smaller --block-size")
        self.config, self.name, self.world = config, config.model, world()
        self.model = build_language_model(config, self.tokenizer.vocab_size)
        self.model.flatten_parameters()  # before the optimizer and the replicas: their passes take whole runs
        self.optimizer = AdamW(param_groups(self.model, config.weight_decay), lr=config.learning_rate,
                               betas=(config.beta1, config.beta2))
        self.total_steps = config.max_iters
        self.schedule = WarmupCosine(config.learning_rate, config.min_lr, config.warmup_iters,
                                     config.lr_decay_iters or config.max_iters)
        self.batch_rng = numpy.random.default_rng([config.seed, 1])
        self.eval_rng = numpy.random.default_rng([config.seed, 2])
        on_cpu = xp.__name__ == "numpy"  # threads share one GPU to no gain: one replica there
        precision.set_compute_dtype(config.dtype)  # until finish(): the products of this run
        # fp16: dynamic loss scaling (skip the step and halve the scale on an overflow), as torch's GradScaler
        self.scaler = precision.GradScaler() if config.dtype == "fp16" else None
        loss_fn = CrossEntropyLoss() if self.scaler is None else precision.ScaledLoss(CrossEntropyLoss(), self.scaler)
        if self.scaler is not None:
            self.scaler.guard(self.optimizer)
        self.parallel = DataParallel(self.model, loss_fn, config.replicas if on_cpu else 1)
        self.generators = {"batch": self.batch_rng, "eval": self.eval_rng, **model_generators(self.model),
                           **self.parallel.generators()}
        self.grads = [grad for _, grad in self.model.named_grads()]  # the same arrays every step
        self.weights_path = Path(config.out) / WEIGHTS_NAME
        self.plot_title = f"{config.model} on " + Path(config.data or "tiny shakespeare").name
        self.best_val, self.best_step, self.last = math.inf, None, {}
        shape = (f"gpt {config.n_layer}x{config.n_embd}" if config.model == "gpt"
                 else f"{config.cell} {config.num_layers}x{config.hidden_size}")
        log(f"{shape} ({self.model.num_parameters():,} parameters), "
            f"vocab {self.tokenizer.vocab_size}, {len(self.train_ids):,} train / {len(self.val_ids):,} val characters")

    def forward_backward(self, step: int, micro: int = 0) -> float:
        """Micro-step ``micro`` of step ``step``: this rank's ``batch_size`` windows of the global batch.

        Every rank draws the windows of all ``N`` ranks from the shared
        generator and keeps its own run of them, so that ``N`` ranks step as
        one process on ``N`` times the batch; the loss and its gradient are
        weighted by ``1 / grad_accum``.
        """
        batch, ranks = self.config.batch_size, self.world.size
        x, y = random_windows(self.train_ids, self.config.block_size, batch * ranks, self.batch_rng)
        if ranks > 1:
            mine = slice(self.world.rank * batch, (self.world.rank + 1) * batch)
            x, y = x[mine], y[mine]
        return self.parallel.forward_backward(asarray(x), asarray(y), 1.0 / self.config.grad_accum)

    def gradient_norm(self) -> float:
        if self.scaler is None:
            return clip_grad_norm(self.grads, self.config.grad_clip)
        self.scaler.unscale(self.grads)
        norm = clip_grad_norm(self.grads, self.config.grad_clip)
        self.scaler.update(math.isfinite(norm))  # an overflow: the optimizer skips this step, the scale halves
        return norm if math.isfinite(norm) else 0.0  # a skipped fp16 step is not an error

    def discard_step(self) -> None:
        pass

    def stretch(self, start: int, end: int) -> str:
        """Steps ``start + 1 .. end`` in words, for messages."""
        return f"steps {start + 1} to {end}"

    def evaluation_due(self, step: int) -> bool:
        return step % self.config.eval_interval == 0 or step == self.config.max_iters

    def evaluate(self, step: int) -> dict:
        splits = {"train": self.train_ids, "val": self.val_ids}
        self.last = estimate_loss(self.parallel, splits, self.config, self.eval_rng)
        return dict(self.last)

    def evaluation_line(self, step: int, metrics: dict, ms_per_step: float) -> str:
        return (f"step {step} | train {metrics['train']:.4f} | val {metrics['val']:.4f} | "
                f"lr {self.optimizer.lr:.1e} | {speed(ms_per_step, self)}")

    def row_extras(self, step: int) -> dict:
        return {}

    def after_evaluation(self, step: int, metrics: dict) -> None:
        if metrics["val"] < self.best_val:
            self.best_val, self.best_step = metrics["val"], step
            save_model(self.weights_path, self.model, vocab=self.tokenizer.vocab, step=str(step))

    def state(self, step: int) -> dict:
        scaler = {} if self.scaler is None else {"scaler": self.scaler.state()}
        return {"last": self.last, "best_val": finite_or_none(self.best_val), "best_step": self.best_step, **scaler}

    def load_state(self, state: dict, step: int) -> None:
        self.last = state["last"]
        self.best_val = math.inf if state["best_val"] is None else state["best_val"]
        self.best_step = state.get("best_step")
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state(state["scaler"])

    def check_resume(self, metadata: dict, path) -> None:
        if metadata.get("vocab") != self.tokenizer.vocab:
            raise CheckpointError(f"{path}: the text's characters differ from the checkpoint's vocabulary "
                                  "(was --data changed?)")

    def checkpoint_metadata(self) -> dict:
        return {"vocab": self.tokenizer.vocab}

    def weights_note(self) -> str:
        if not math.isfinite(self.best_val):
            return ""
        at = f" at step {self.best_step}" if self.best_step is not None else ""
        return f"; the best weights (val {self.best_val:.4f}{at}) in {self.weights_path}"

    def finish(self, stopped: bool) -> None:
        self.parallel.close()
        precision.set_compute_dtype("float32")
        if stopped:
            checkpoint = self.weights_path.with_name("checkpoint.safetensors")
            log(f"sample the latest weights with: mnn sample {checkpoint}")
        else:
            log(f"best val {self.best_val:.4f}; weights in {self.weights_path}")

    def result_of(self, step: int, last_loss, ms_per_step: float) -> dict:
        return {"best_val": self.best_val, "train": self.last.get("train"), "val": self.last.get("val"),
                "iters": step, "ms_per_step": ms_per_step}


def train_language_model(config, resume=None, on_iteration=None) -> dict:
    """Train the model ``config`` names (a GPT or a char-rnn) with AdamW, warm-up + cosine, clipping; keep the best-val weights in ``config.out``.

    A full checkpoint (``checkpoint.safetensors``: weights, AdamW moments,
    iteration, the batch, evaluation and dropout generators, history) is
    written after every evaluation, every ``checkpoint_interval`` iterations
    if set, and when SIGINT or SIGTERM arrives; then the run stops cleanly
    and ``train_gpt(config, resume=config.out)`` continues it exactly.

    A non-finite loss or gradient norm stops the run with
    :class:`~mnn.errors.TrainingError` (the checkpoints are kept), or the step
    is skipped with ``skip_nonfinite``.

    ``on_iteration(it)``, if given, is called at the top of every iteration
    ``it`` (before its evaluation, if any, and its step), up to and including
    ``it = max_iters``, which only evaluates: for a progress display of your
    own, or to hand the machine over in turns (``benchmarks.recipe``).

    Returns:
        ``{"best_val": ..., "train": ..., "val": ..., "iters": ...}``, and
        ``"interrupted": True`` when a signal stopped the run.
    """
    return run(LanguageModelTask(config), resume=resume, on_step=on_iteration)


train_gpt = train_char_rnn = train_language_model  # the names of the commands: mnn train gpt, mnn train lstm


def sample_file(path, prompt: str = "\n", tokens: int = 500, temperature: float = 0.8,
                top_k: int | None = 40, seed: int = 1) -> str:
    """Generate ``tokens`` characters after ``prompt`` from a saved GPT; returns prompt + generation."""
    model, metadata = load_model(path)
    if "vocab" not in metadata or not hasattr(model, "generate"):
        raise DataError(f"{path}: not a character-level language model (no vocabulary in its metadata)")
    tokenizer = CharTokenizer(str(metadata["vocab"]))
    if not prompt:
        raise DataError("the prompt is empty: give at least one character")
    ids = tokenizer.encode(prompt)[None, :]
    model.eval()
    out = model.generate(asarray(ids), tokens, temperature=temperature, top_k=top_k,
                         rng=numpy.random.default_rng(seed))
    return tokenizer.decode(numpy.asarray(out)[0])
