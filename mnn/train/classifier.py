"""Train an MLP classifier on Fashion-MNIST or MNIST: the whole loop, forward to update, in one page."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from mnn.backend import asarray, default_dtype, to_numpy, xp
from mnn.data import load_vision_dataset, minibatches
from mnn.errors import CheckpointError, DataError, TrainingError
from mnn.io import save_model
from mnn.io.checkpoint import (
    CHECKPOINT_NAME,
    WEIGHTS_NAME,
    load_checkpoint,
    model_generators,
    save_checkpoint,
    weights_finite,
)
from mnn.losses import CrossEntropyLoss
from mnn.models import MLP
from mnn.module import no_grad
from mnn.optim import SGD, Adam, AdamW, param_groups
from mnn.optim.schedules import Constant, WarmupCosine
from mnn.train.reporting import (
    History,
    StepTimer,
    StopRequest,
    grad_norm,
    log,
    progress_bar,
    resume_command,
)


@dataclass
class MLPTrainConfig:
    """Everything that defines an MLP run (saved with its weights)."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    hidden: list[int] = field(default_factory=lambda: [256])
    activation: str = "relu"
    dropout: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    min_lr: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0
    log_interval: int = 250
    out: str = "runs/mlp"
    checkpoint_interval: int = 0  # steps between checkpoints (0: after every epoch and on a signal only)
    skip_nonfinite: bool = False  # skip a step whose loss or gradient is NaN/inf instead of stopping


# Named recipes: `mnn train mlp --preset NAME`. Measured figures are in the README.
PRESETS = {
    "default": {},
    "fashion-best": {"hidden": [1024, 1024], "dropout": 0.2, "epochs": 20, "batch_size": 128,
                     "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 200},
}


def standardize(images, mean: float, std: float):
    """uint8 images ``(N, 28, 28)`` -> float rows ``(N, 784)`` with zero mean and unit variance."""
    rows = images.reshape(len(images), -1).astype(default_dtype())
    rows *= 1.0 / 255.0
    rows -= mean
    rows *= 1.0 / std
    return asarray(rows)


@no_grad()
def accuracy(model, x, y, batch_size: int = 2000) -> float:
    """Fraction of rows whose arg-max logit equals the label (evaluation mode, under no_grad)."""
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model.forward(x[start:start + batch_size])
        correct += int((logits.argmax(axis=1) == y[start:start + batch_size]).sum())
    model.train()
    return correct / len(x)


def make_optimizer(config: MLPTrainConfig, model):
    if config.optimizer == "sgd":
        return SGD(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return Adam(model, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    raise ValueError(f"unknown optimizer {config.optimizer!r}: expected sgd, adam or adamw")


def make_schedule(config: MLPTrainConfig, total_steps: int):
    if config.schedule == "constant":
        return Constant(config.lr)
    if config.schedule == "cosine":
        return WarmupCosine(config.lr, config.min_lr, config.warmup_steps, total_steps)
    raise ValueError(f"unknown schedule {config.schedule!r}: expected constant or cosine")


def train_mlp(config: MLPTrainConfig, resume=None) -> dict:
    """Train, evaluate after every epoch, save ``model.safetensors`` and the history in ``config.out``.

    A full checkpoint (``checkpoint.safetensors``: weights, optimizer state,
    position in the epoch, dropout generators, history) is written after every
    epoch, every ``checkpoint_interval`` steps if set, and when SIGINT or
    SIGTERM arrives; then the run stops cleanly and ``train_mlp(config,
    resume=config.out)`` continues it exactly, to bitwise-identical weights.

    A non-finite loss or gradient stops the run with :class:`TrainingError`
    (the last checkpoint is kept), or is skipped with ``skip_nonfinite``.

    Returns:
        ``{"test_acc": ..., "loss": ..., "steps": ...}`` of the final epoch, and
        ``"interrupted": True`` when a signal stopped the run.
    """
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(f"epochs and batch size must be at least 1, got {config.epochs} and {config.batch_size}")
    data = load_vision_dataset(config.dataset, data_dir=config.data_dir)
    train_images, train_labels = data["train"]
    test_images, test_labels = data["test"]
    if len(train_images) == 0 or len(test_images) == 0:
        raise DataError(f"the {config.dataset} data holds no {'training' if len(train_images) == 0 else 'test'} images")
    if config.batch_size > len(train_images):
        raise DataError(f"batch size {config.batch_size} is larger than the {len(train_images)} training images")
    pixels = train_images.astype(numpy.float64) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    if not std > 0:
        raise DataError(f"the {config.dataset} training images are all the same value: nothing to learn")
    x_train, x_test = standardize(train_images, mean, std), standardize(test_images, mean, std)
    y_train, y_test = asarray(train_labels), asarray(test_labels)

    model = MLP(x_train.shape[1], config.hidden, 10, config.activation, config.dropout, config.seed)
    model.config.update(dataset=config.dataset, mean=mean, std=std)
    loss_fn = CrossEntropyLoss()
    optimizer = make_optimizer(config, model)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    schedule = make_schedule(config, total_steps)
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT_NAME
    generators = model_generators(model)
    history = History()
    step, start_epoch, batches_done, running, result, saved_step, last_loss = 0, 1, 0, [], {}, None, None
    if resume is not None:
        resumed = Path(resume) / CHECKPOINT_NAME
        metadata = load_checkpoint(resumed, model, optimizer, generators)
        state = metadata["state"]
        step, start_epoch, batches_done = metadata["step"], state["epoch"], state["batches_done"]
        running = [xp.asarray(value, dtype=default_dtype()) for value in state["running"]]
        history, result, saved_step = History(state["history"]), state["result"], step
        last_loss = state["last_loss"]
        if step != steps_per_epoch * (start_epoch - 1) + batches_done:
            raise CheckpointError(f"{resumed}: step {step} does not match epoch {start_epoch}, batch {batches_done} "
                                  f"of {steps_per_epoch} (was the data or the batch size changed?)")
        log(f"resumed from {resumed} at step {step} (epoch {start_epoch}, batch {batches_done})")
    log(f"mlp {model.config['hidden']} on {config.dataset}: {model.num_parameters():,} parameters, "
        f"{total_steps} steps of {config.batch_size}")

    def save_checkpoint_at(epoch: int, done: int) -> None:
        nonlocal saved_step
        state = {"epoch": epoch, "batches_done": done, "running": [float(to_numpy(v)) for v in running],
                 "history": history.rows, "result": result, "last_loss": last_loss}
        save_checkpoint(checkpoint_path, model, optimizer, generators, dataclasses.asdict(config), step, state)
        saved_step = step

    def stop_nonfinite(what: str, value, skipping: bool = False) -> None:
        kept = (f"the last good checkpoint (step {saved_step}) is kept in {checkpoint_path}; "
                f"resume with: {resume_command('mlp', out)}" if saved_step is not None
                else "no checkpoint had been saved yet")
        hint = "" if skipping else ", or pass --skip-nonfinite to skip such steps"
        raise TrainingError(f"{what} became {value} at step {step + 1}: training stopped; {kept}. "
                            f"Lower the learning rate{hint}")

    bar = progress_bar(total_steps, initial=step, description="train")
    timer = StepTimer()
    with StopRequest() as stop:
        for epoch in range(start_epoch, config.epochs + 1):
            order_rng = numpy.random.default_rng([config.seed, epoch])
            done = batches_done if epoch == start_epoch else 0
            skipped = 0
            batches = minibatches(x_train, y_train, config.batch_size, rng=order_rng)
            for x, y in itertools.islice(batches, done, None):
                optimizer.lr = schedule(step)
                optimizer.zero_grad()
                loss = loss_fn.forward(model.forward(x), y)
                loss_value = float(loss)
                if math.isfinite(loss_value):
                    model.backward(loss_fn.backward())
                    norm = grad_norm(model.named_grads())
                if not math.isfinite(loss_value) or not math.isfinite(norm):
                    what, value = ("loss", loss_value) if not math.isfinite(loss_value) else ("gradient norm", norm)
                    if not config.skip_nonfinite:
                        stop_nonfinite(what, value)
                    if not weights_finite(model):  # skipping cannot bring NaN weights back
                        stop_nonfinite("a weight", "non-finite", skipping=True)
                    log(f"step {step + 1} | {what} {value}: step skipped", bar)
                    loss_fn.cache = None
                    skipped += 1
                else:
                    optimizer.step()
                    running.append(loss)
                    last_loss = loss_value
                step += 1
                done += 1
                timer.tick()
                if bar is not None:
                    bar.update(1)
                if step % config.log_interval == 0 and running:
                    mean_loss = float(xp.mean(xp.stack(running)))
                    running = []
                    log(f"step {step} | loss {mean_loss:.4f} | {timer.read_ms():.1f} ms/step", bar)
                    history.add(step=step, epoch=epoch, loss=mean_loss, lr=optimizer.lr)
                if stop.requested or (config.checkpoint_interval and step % config.checkpoint_interval == 0):
                    save_checkpoint_at(epoch, done)
                if stop.requested:
                    break
            if stop.requested and done < steps_per_epoch:
                break
            if skipped and skipped == done - (batches_done if epoch == start_epoch else 0):
                raise TrainingError(f"every step of epoch {epoch} was skipped (non-finite loss or gradient): "
                                    f"the model is broken, training stopped; "
                                    + (f"the last good checkpoint (step {saved_step}) is kept in {checkpoint_path}"
                                       if saved_step is not None else "no checkpoint had been saved yet")
                                    + ". Lower the learning rate")
            test_acc = accuracy(model, x_test, y_test)
            log(f"epoch {epoch} | step {step} | test_acc {test_acc:.4f}", bar)
            history.add(step=step, epoch=epoch, test_acc=test_acc)
            result = {"test_acc": test_acc, "loss": last_loss, "steps": step}
            save_checkpoint_at(epoch + 1, 0)
            if stop.requested:
                break
    if bar is not None:
        bar.close()

    save_model(out / WEIGHTS_NAME, model, train_config=dataclasses.asdict(config))
    history.write(out)
    history.plot(out / "loss.png", ["loss"], f"MLP on {config.dataset}")
    if stop.requested and step < total_steps:
        log(f"stopped by {stop.signal_name} at step {step} of {total_steps}: checkpoint saved in {checkpoint_path}")
        log(f"resume with: {resume_command('mlp', out)}")
        return {**result, "steps": step, "interrupted": True}
    log(f"saved {out / WEIGHTS_NAME}")
    return result


def evaluate_file(path, data_dir=None) -> float:
    """Test accuracy of a saved MLP on the dataset it was trained on."""
    from mnn.io import load_model  # noqa: PLC0415

    model, metadata = load_model(path)
    config = metadata["config"]
    kind = config.get("kind", "gpt" if "n_layer" in config else None)
    if kind != "mlp":
        raise DataError(f"{path}: a {kind} model, not an MLP classifier" + (": use mnn sample" if kind == "gpt" else ""))
    test_images, test_labels = load_vision_dataset(config["dataset"], data_dir=data_dir)["test"]
    return accuracy(model, standardize(test_images, config["mean"], config["std"]), asarray(test_labels))
