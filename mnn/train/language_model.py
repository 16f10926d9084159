"""Train a character-level GPT (nanoGPT's recipe), and sample from it."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy

from mnn.backend import asarray, xp
from mnn.data import (
    CharTokenizer,
    load_text,
    random_windows,
    split_train_val,
    tiny_shakespeare_path,
)
from mnn.errors import CheckpointError, DataError, TrainingError
from mnn.io import load_model, save_model
from mnn.io.checkpoint import (
    CHECKPOINT_NAME,
    WEIGHTS_NAME,
    finite_or_none,
    model_generators,
    read_checkpoint,
    restore,
    save_checkpoint,
    weights_finite,
)
from mnn.losses import CrossEntropyLoss
from mnn.models.gpt import GPT, GPTConfig
from mnn.optim import AdamW, clip_grad_norm, param_groups
from mnn.optim.schedules import WarmupCosine
from mnn.parallel import DataParallel
from mnn.train.reporting import (
    History,
    StepTimer,
    StopRequest,
    log,
    progress_bar,
    resume_command,
)


@dataclass
class GPTTrainConfig:
    """One GPT run; field names follow nanoGPT's ``train.py``."""

    data: str | None = None
    out: str = "runs/gpt"
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # nanoGPT train.py: no biases in Linear and LayerNorm
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
    replicas: int = 2  # slices of each batch run at once in threads (mnn.parallel); 1 on a GPU


PRESETS = {
    # nanoGPT's README recipe for a CPU: val about 1.88 after 2000 iterations.
    "shakespeare-char-cpu": {"block_size": 64, "batch_size": 12, "n_layer": 4, "n_head": 4, "n_embd": 128,
                             "max_iters": 2000, "dropout": 0.0, "learning_rate": 1e-3, "min_lr": 1e-4,
                             "warmup_iters": 100},
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


def check_config(config: GPTTrainConfig) -> None:
    """Refuse impossible options before any data is read (the CLI checks types; this checks combinations)."""
    for name in ("block_size", "n_layer", "n_head", "n_embd", "batch_size", "max_iters", "eval_interval",
                 "eval_iters", "log_interval"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd {config.n_embd} must be divisible by n_head {config.n_head}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
    if not isinstance(config.replicas, int) or isinstance(config.replicas, bool) or config.replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {config.replicas!r}")


def train_gpt(config: GPTTrainConfig, resume=None, on_iteration=None) -> dict:
    """Train with AdamW, warm-up + cosine, clipping; keep the best-val weights in ``config.out``.

    A full checkpoint (``checkpoint.safetensors``: weights, AdamW moments,
    iteration, the batch, evaluation and dropout generators, history) is
    written after every evaluation, every ``checkpoint_interval`` iterations
    if set, and when SIGINT or SIGTERM arrives; then the run stops cleanly
    and ``train_gpt(config, resume=config.out)`` continues it exactly.

    A non-finite loss or gradient norm stops the run with
    :class:`TrainingError` (the checkpoints are kept), or the step is skipped
    with ``skip_nonfinite``.

    ``on_iteration(it)``, if given, is called at the top of every iteration
    ``it`` (before its evaluation, if any, and its step), up to and including
    ``it = max_iters``, which only evaluates: for a progress display of your
    own, or to hand the machine over in turns (``benchmarks.recipe``).

    Returns:
        ``{"best_val": ..., "train": ..., "val": ..., "iters": ...}``, and
        ``"interrupted": True`` when a signal stopped the run.
    """
    check_config(config)
    tokenizer, train_ids, val_ids = prepare_text(tiny_shakespeare_path(config.data))
    for name, ids in [("train", train_ids), ("val", val_ids)]:
        if len(ids) <= config.block_size:
            raise DataError(f"the {name} split has {len(ids)} characters, not more than block_size "
                            f"{config.block_size}: use a longer text or a smaller --block-size")
    model_config = GPTConfig(block_size=config.block_size, vocab_size=tokenizer.vocab_size,
                             n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                             dropout=config.dropout, bias=config.bias)
    model = GPT(model_config, seed=config.seed)
    loss_fn = CrossEntropyLoss()
    optimizer = AdamW(param_groups(model, config.weight_decay), lr=config.learning_rate,
                      betas=(config.beta1, config.beta2))
    schedule = WarmupCosine(config.learning_rate, config.min_lr, config.warmup_iters,
                            config.lr_decay_iters or config.max_iters)
    batch_rng = numpy.random.default_rng([config.seed, 1])
    eval_rng = numpy.random.default_rng([config.seed, 2])
    on_cpu = xp.__name__ == "numpy"  # threads share one GPU to no gain: one replica there
    parallel = DataParallel(model, loss_fn, config.replicas if on_cpu else 1)
    generators = {"batch": batch_rng, "eval": eval_rng, **model_generators(model), **parallel.generators()}
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT_NAME
    history = History()
    best_val, last, start, evaluated, step_ms, saved_step = math.inf, {}, 0, False, 0.0, None
    if resume is not None:
        resumed = Path(resume) / CHECKPOINT_NAME
        tensors, metadata = read_checkpoint(resumed)
        if metadata.get("vocab") != tokenizer.vocab:
            raise CheckpointError(f"{resumed}: the text's characters differ from the checkpoint's vocabulary "
                                  "(was --data changed?)")
        restore(tensors, metadata, resumed, model, optimizer, generators)
        state = metadata["state"]
        start, evaluated, last = metadata["step"], state["evaluated"], state["last"]
        best_val = math.inf if state["best_val"] is None else state["best_val"]
        history, saved_step = History(state["history"]), start
        optimizer.lr = state["lr"]
        log(f"resumed from {resumed} at step {start}")
    log(f"gpt {model_config.n_layer}x{model_config.n_embd} ({model.num_parameters():,} parameters), "
        f"vocab {tokenizer.vocab_size}, {len(train_ids):,} train / {len(val_ids):,} val characters")

    def save_checkpoint_at(it: int, evaluated_here: bool) -> None:
        nonlocal saved_step
        state = {"evaluated": evaluated_here, "last": last, "lr": optimizer.lr,  # no timings: runs must match
                 "best_val": finite_or_none(best_val), "history": history.rows}
        save_checkpoint(checkpoint_path, model, optimizer, generators, dataclasses.asdict(config), it, state,
                        vocab=tokenizer.vocab)
        saved_step = it

    def kept_message() -> str:
        if saved_step is None:
            return "nothing was saved yet"
        return (f"the last checkpoint (step {saved_step}) is kept in {checkpoint_path}, the best weights "
                f"(val {best_val:.4f}) in {out / WEIGHTS_NAME}; resume with: {resume_command('gpt', out)}")

    grads = [grad for _, grad in model.named_grads()]  # the same arrays every step: collected once
    bar = progress_bar(config.max_iters, initial=start, description="train")
    timer = StepTimer()
    interval = config.checkpoint_interval
    with StopRequest() as stop:
        for it in range(start, config.max_iters + 1):
            evaluated_here = it == start and evaluated
            if on_iteration is not None:
                on_iteration(it)
            if stop.requested:  # the signal came during the last step: save before anything else
                save_checkpoint_at(it, evaluated_here)
                break
            if (it % config.eval_interval == 0 or it == config.max_iters) and not evaluated_here:
                started = time.perf_counter()
                last = estimate_loss(parallel, {"train": train_ids, "val": val_ids}, config, eval_rng)
                timer.start += time.perf_counter() - started  # evaluation does not count as step time
                step_ms = timer.read_ms() if it else 0.0
                log(f"step {it} | train {last['train']:.4f} | val {last['val']:.4f} | "
                    f"lr {optimizer.lr:.1e} | {step_ms:.1f} ms/step", bar)
                history.add(step=it, train=last["train"], val=last["val"], lr=optimizer.lr)
                if not (math.isfinite(last["train"]) and math.isfinite(last["val"])):
                    raise TrainingError(f"the evaluated loss is {last['train']} (train) / {last['val']} (val) at "
                                        f"step {it}: the model is broken, training stopped; "
                                        f"{kept_message()}. Lower the learning rate")
                if last["val"] < best_val:
                    best_val = last["val"]
                    save_model(out / WEIGHTS_NAME, model, vocab=tokenizer.vocab, step=str(it))
                evaluated_here = True
                save_checkpoint_at(it, True)
            if stop.requested and saved_step != it:
                save_checkpoint_at(it, evaluated_here)
            if it == config.max_iters or stop.requested:
                break
            optimizer.lr = schedule(it)
            x, y = random_windows(train_ids, config.block_size, config.batch_size, batch_rng)
            optimizer.zero_grad()
            loss_value = parallel.forward_backward(asarray(x), asarray(y))
            norm = math.nan
            if math.isfinite(loss_value):
                norm = clip_grad_norm(grads, config.grad_clip)
            if not math.isfinite(loss_value) or not math.isfinite(norm):
                what, value = ("loss", loss_value) if not math.isfinite(loss_value) else ("gradient norm", norm)
                if not config.skip_nonfinite or not weights_finite(model):
                    hint = "" if config.skip_nonfinite else ", or pass --skip-nonfinite to skip such steps"
                    raise TrainingError(f"{what} became {value} at step {it}: training stopped; {kept_message()}. "
                                        f"Lower the learning rate{hint}")
                log(f"step {it} | {what} {value}: step skipped", bar)
            else:
                optimizer.step()
            timer.tick()
            if bar is not None:
                bar.update(1)
            if (it + 1) % config.log_interval == 0 and (it + 1) % config.eval_interval != 0:
                history.add(step=it + 1, loss=loss_value, lr=optimizer.lr)
            if interval and (it + 1) % interval == 0:
                save_checkpoint_at(it + 1, False)
    if bar is not None:
        bar.close()
    parallel.close()

    history.write(out)
    history.plot(out / "loss.png", ["loss", "train", "val"], "GPT on " + Path(config.data or "tiny shakespeare").name)
    if stop.requested and saved_step < config.max_iters:
        log(f"stopped by {stop.signal_name} at step {saved_step} of {config.max_iters}: checkpoint saved in "
            f"{checkpoint_path}")
        log(f"resume with: {resume_command('gpt', out)}")
        return {"best_val": best_val, "train": last.get("train"), "val": last.get("val"), "iters": saved_step,
                "ms_per_step": step_ms, "interrupted": True}
    log(f"best val {best_val:.4f}; weights in {out / WEIGHTS_NAME}")
    return {"best_val": best_val, "train": last["train"], "val": last["val"], "iters": config.max_iters,
            "ms_per_step": step_ms}


def sample_file(path, prompt: str = "\n", tokens: int = 500, temperature: float = 0.8,
                top_k: int | None = 40, seed: int = 1) -> str:
    """Generate ``tokens`` characters after ``prompt`` from a saved GPT; returns prompt + generation."""
    model, metadata = load_model(path)
    if "vocab" not in metadata or not isinstance(model, GPT):
        raise DataError(f"{path}: not a character-level GPT (no vocabulary in its metadata)")
    tokenizer = CharTokenizer(str(metadata["vocab"]))
    if not prompt:
        raise DataError("the prompt is empty: give at least one character")
    ids = tokenizer.encode(prompt)[None, :]
    model.eval()
    out = model.generate(asarray(ids), tokens, temperature=temperature, top_k=top_k,
                         rng=numpy.random.default_rng(seed))
    return tokenizer.decode(numpy.asarray(out)[0])
