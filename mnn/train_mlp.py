"""Train an MLP classifier on Fashion-MNIST or MNIST: the whole loop, forward to update, in one page."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from mnn.backend import asarray, default_dtype, to_numpy, xp
from mnn.data import load_vision_dataset, minibatches
from mnn.errors import DataError
from mnn.io import save_model
from mnn.losses import CrossEntropyLoss
from mnn.models import MLP
from mnn.optim import SGD, Adam, AdamW, param_groups
from mnn.schedules import Constant, WarmupCosine
from mnn.training import History, StepTimer, log, progress_bar


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


def accuracy(model, x, y, batch_size: int = 2000) -> float:
    """Fraction of rows whose arg-max logit equals the label (evaluation mode, no caches kept)."""
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model.forward(x[start:start + batch_size])
        correct += int((logits.argmax(axis=1) == y[start:start + batch_size]).sum())
    for _, module in model.named_modules():
        module.cache = None
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


def train_mlp(config: MLPTrainConfig) -> dict:
    """Train, evaluate after every epoch, save ``model.safetensors`` and the history in ``config.out``.

    Returns:
        ``{"test_acc": ..., "loss": ..., "steps": ...}`` of the final epoch.
    """
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(f"epochs and batch size must be at least 1, got {config.epochs} and {config.batch_size}")
    data = load_vision_dataset(config.dataset, data_dir=config.data_dir)
    train_images, train_labels = data["train"]
    test_images, test_labels = data["test"]
    if config.batch_size > len(train_images):
        raise DataError(f"batch size {config.batch_size} is larger than the {len(train_images)} training images")
    pixels = train_images.astype(numpy.float64) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
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
    history = History()
    log(f"mlp {model.config['hidden']} on {config.dataset}: {model.num_parameters():,} parameters, "
        f"{total_steps} steps of {config.batch_size}")

    bar = progress_bar(total_steps, description="train")
    timer, step, running = StepTimer(), 0, []
    result = {}
    for epoch in range(1, config.epochs + 1):
        order_rng = numpy.random.default_rng([config.seed, epoch])
        for x, y in minibatches(x_train, y_train, config.batch_size, rng=order_rng):
            optimizer.lr = schedule(step)
            optimizer.zero_grad()
            loss = loss_fn.forward(model.forward(x), y)
            model.backward(loss_fn.backward())
            optimizer.step()
            step += 1
            timer.tick()
            running.append(loss)
            if bar is not None:
                bar.update(1)
            if step % config.log_interval == 0:
                mean_loss = float(xp.mean(xp.stack(running)))
                running = []
                log(f"step {step} | loss {mean_loss:.4f} | {timer.read_ms():.1f} ms/step", bar)
                history.add(step=step, epoch=epoch, loss=mean_loss, lr=optimizer.lr)
        test_acc = accuracy(model, x_test, y_test)
        train_loss = float(to_numpy(loss))
        log(f"epoch {epoch} | step {step} | test_acc {test_acc:.4f}", bar)
        history.add(step=step, epoch=epoch, test_acc=test_acc)
        result = {"test_acc": test_acc, "loss": train_loss, "steps": step}
    if bar is not None:
        bar.close()

    save_model(out / "model.safetensors", model, train_config=dataclasses.asdict(config))
    history.write(out)
    history.plot(out / "loss.png", ["loss"], f"MLP on {config.dataset}")
    log(f"saved {out / 'model.safetensors'}")
    return result


def evaluate_file(path, data_dir=None) -> float:
    """Test accuracy of a saved MLP on the dataset it was trained on."""
    from mnn.io import load_model  # noqa: PLC0415

    model, metadata = load_model(path)
    config = metadata["config"]
    if config.get("kind") != "mlp":
        raise DataError(f"{path}: not an MLP classifier (kind {config.get('kind')!r})")
    test_images, test_labels = load_vision_dataset(config["dataset"], data_dir=data_dir)["test"]
    return accuracy(model, standardize(test_images, config["mean"], config["std"]), asarray(test_labels))
