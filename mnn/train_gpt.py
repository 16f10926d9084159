"""Train a character-level GPT (nanoGPT's recipe), and sample from it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy

from mnn.backend import asarray
from mnn.data import CharTokenizer, load_text, random_windows, split_train_val, tiny_shakespeare_path
from mnn.errors import DataError, TrainingError
from mnn.gpt import GPT, GPTConfig
from mnn.io import load_model, save_model
from mnn.losses import CrossEntropyLoss
from mnn.optim import AdamW, clip_grad_norm, param_groups
from mnn.schedules import WarmupCosine
from mnn.training import History, StepTimer, log, progress_bar


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
    bias: bool = True
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


def estimate_loss(model, loss_fn, splits: dict, config: GPTTrainConfig, rng) -> dict:
    """Mean loss over ``eval_iters`` random batches of each split, in evaluation mode."""
    model.eval()
    losses = {}
    for name, ids in splits.items():
        total = 0.0
        for _ in range(config.eval_iters):
            x, y = random_windows(ids, config.block_size, config.batch_size, rng)
            total += float(loss_fn.forward(model.forward(asarray(x)), asarray(y)))
        losses[name] = total / config.eval_iters
    model.release_caches()
    loss_fn.cache = None
    model.train()
    return losses


def train_gpt(config: GPTTrainConfig) -> dict:
    """Train with AdamW, warm-up + cosine, clipping; keep the best-val weights in ``config.out``.

    Returns:
        ``{"best_val": ..., "train": ..., "val": ..., "iters": ...}``.
    """
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
    out = Path(config.out)
    history = History()
    log(f"gpt {model_config.n_layer}x{model_config.n_embd} ({model.num_parameters():,} parameters), "
        f"vocab {tokenizer.vocab_size}, {len(train_ids):,} train / {len(val_ids):,} val characters")

    best_val, last = math.inf, {}
    bar = progress_bar(config.max_iters, description="train")
    timer = StepTimer()
    step_ms = 0.0
    for it in range(config.max_iters + 1):
        if it % config.eval_interval == 0 or it == config.max_iters:
            started = time.perf_counter()
            last = estimate_loss(model, loss_fn, {"train": train_ids, "val": val_ids}, config, eval_rng)
            timer.start += time.perf_counter() - started  # evaluation does not count as step time
            step_ms = timer.read_ms() if it else 0.0
            log(f"step {it} | train {last['train']:.4f} | val {last['val']:.4f} | "
                f"lr {optimizer.lr:.1e} | {step_ms:.1f} ms/step", bar)
            history.add(step=it, train=last["train"], val=last["val"], lr=optimizer.lr)
            if last["val"] < best_val:
                best_val = last["val"]
                save_model(out / "model.safetensors", model, vocab=tokenizer.vocab, step=str(it))
        if it == config.max_iters:
            break
        optimizer.lr = schedule(it)
        x, y = random_windows(train_ids, config.block_size, config.batch_size, batch_rng)
        optimizer.zero_grad()
        loss = loss_fn.forward(model.forward(asarray(x)), asarray(y))
        model.backward(loss_fn.backward())
        clip_grad_norm(model.named_grads(), config.grad_clip)
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss became {loss_value} at step {it}; the best weights so far "
                                f"(val {best_val:.4f}) are kept in {out / 'model.safetensors'}")
        optimizer.step()
        timer.tick()
        if bar is not None:
            bar.update(1)
        if (it + 1) % config.log_interval == 0 and (it + 1) % config.eval_interval != 0:
            history.add(step=it + 1, loss=loss_value, lr=optimizer.lr)
    if bar is not None:
        bar.close()

    history.write(out)
    history.plot(out / "loss.png", ["loss", "train", "val"], "GPT on " + Path(config.data or "tiny shakespeare").name)
    log(f"best val {best_val:.4f}; weights in {out / 'model.safetensors'}")
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
