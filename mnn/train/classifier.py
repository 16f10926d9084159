"""Image classification: an MLP or a CNN on Fashion-MNIST or MNIST, trained by :mod:`mnn.train.loop`."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy

from mnn.backend import asarray, default_dtype, read_scalar, xp
from mnn.data import load_vision_dataset, minibatches
from mnn.distributed import shard, world
from mnn.errors import CheckpointError, DataError
from mnn.io import WEIGHTS_NAME, load_model, save_model
from mnn.io.checkpoint import model_generators
from mnn.losses import CrossEntropyLoss
from mnn.models import CNN, MLP, model_kind
from mnn.module import no_grad
from mnn.optim import SGD, Adam, AdamW, Constant, WarmupCosine, grad_norm, param_groups
from mnn.parallel import DataParallel
from mnn.train.loop import run
from mnn.train.reporting import log


@dataclass
class MLPTrainConfig:
    """Everything that defines an MLP run (saved with its weights)."""

    model: ClassVar[str] = "mlp"  # the registry name of the model it trains (not a saved option)
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
    grad_accum: int = 1  # micro-batches whose gradients add up to one step (of grad_accum x batch_size images)


@dataclass
class CNNTrainConfig:
    """Everything that defines a CNN run (saved with its weights); the options the MLP has mean the same here."""

    model: ClassVar[str] = "cnn"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    channels: list[int] = field(default_factory=lambda: [32, 64])
    hidden: int = 128
    dropout: float = 0.0
    augment: bool = False  # random shifts by up to 2 pixels and horizontal flips of the training images
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 2e-3
    min_lr: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    log_interval: int = 100
    out: str = "runs/cnn"
    checkpoint_interval: int = 0
    skip_nonfinite: bool = False
    replicas: int = 2  # batch slices run at once, in processes or threads (mnn.parallel); BatchNorm sees each slice
    grad_accum: int = 1


# Named recipes: `mnn train mlp|cnn --preset NAME`. Measured figures are in the README.
CNN_PRESETS = {
    "default": {},
    "fashion-best": {"channels": [64, 128], "hidden": 256, "dropout": 0.3, "augment": True, "epochs": 15,
                     "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 200},
}
PRESETS = {
    "default": {},
    "fashion-best": {"hidden": [1024, 1024], "dropout": 0.2, "epochs": 20, "batch_size": 128,
                     "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 200},
}


def standardize(images, mean: float, std: float, model: str = "mlp"):
    """uint8 images ``(N, 28, 28)`` -> zero mean and unit variance: rows ``(N, 784)`` for an MLP,
    one-channel images ``(N, 1, 28, 28)`` for a CNN."""
    shape = (len(images), -1) if model == "mlp" else (len(images), 1, *images.shape[1:])
    rows = images.reshape(shape).astype(default_dtype())
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


def build_classifier(config, images) -> object:
    """The model ``config.model`` names, sized for ``images`` (as :func:`standardize` gives them)."""
    if config.model == "cnn":
        return CNN(images.shape[1], images.shape[2], config.channels, config.hidden, 10, config.dropout, config.seed)
    return MLP(images.shape[1], config.hidden, 10, config.activation, config.dropout, config.seed)


def shift_and_flip(images, background: float, rng: numpy.random.Generator, shift: int = 2):
    """Training-time augmentation of ``(B, C, H, W)`` images: each moved by up to ``shift`` pixels each way
    (the border filled with ``background``) and mirrored left-right with probability 1/2."""
    B, C, H, W = images.shape
    padded = xp.full((B, C, H + 2 * shift, W + 2 * shift), background, dtype=images.dtype)
    padded[:, :, shift:shift + H, shift:shift + W] = images
    dy, dx = rng.integers(0, 2 * shift + 1, (2, B))
    flip = rng.random(B) < 0.5
    columns = numpy.arange(W)
    columns = numpy.where(flip[:, None], columns[::-1], columns) + dx[:, None]  # (B, W)
    rows = numpy.arange(H)[None, :] + dy[:, None]  # (B, H)
    batch = xp.arange(B)[:, None, None, None]
    channel = xp.arange(C)[None, :, None, None]
    return padded[batch, channel, xp.asarray(rows[:, None, :, None]), xp.asarray(columns[:, None, None, :])]


class ClassifierTask:
    """What is particular to training a classifier; :func:`mnn.train.loop.run` does the rest.

    One step is one mini-batch; an epoch is one shuffled pass over the
    training images (the order drawn from ``[seed, epoch]``, so a resumed run
    draws the same batches). With ``grad_accum`` $A$ and $N$ ranks, a step's
    global batch of $A N B$ images is cut into $A N$ runs of ``batch_size``
    $B$ (the epoch's last, shorter one into near-equal runs), run $m N + r$
    going to rank $r$ in micro-step $m$: the ranks' shards are disjoint and
    cover the epoch, in a new order every epoch, and the step equals one step
    of one process on the global batch. The model is evaluated on the test split after
    every epoch, and its weights are saved in ``model.safetensors`` at the end
    (also when a signal stops the run).
    """

    length_option = "a larger --epochs"
    step_base = 1  # messages count steps from 1
    evaluation_name = "accuracy"
    plot_series = ["loss"]

    def __init__(self, config: MLPTrainConfig) -> None:
        if config.epochs < 1 or config.batch_size < 1 or config.grad_accum < 1:
            raise ValueError(f"epochs, batch size and grad_accum must be at least 1, got {config.epochs}, "
                             f"{config.batch_size} and {config.grad_accum}")
        self.world = world()
        self.global_batch = config.batch_size * self.world.size * config.grad_accum
        data = load_vision_dataset(config.dataset, data_dir=config.data_dir)
        train_images, train_labels = data["train"]
        test_images, test_labels = data["test"]
        if len(train_images) == 0 or len(test_images) == 0:
            empty = "training" if len(train_images) == 0 else "test"
            raise DataError(f"the {config.dataset} data holds no {empty} images")
        if self.global_batch > len(train_images):
            raise DataError(f"batch size {self.global_batch} is larger than the {len(train_images)} training images")
        pixels = train_images.astype(numpy.float64) / 255.0
        mean, std = float(pixels.mean()), float(pixels.std())
        if not std > 0:
            raise DataError(f"the {config.dataset} training images are all the same value: nothing to learn")
        self.name = config.model
        self.x_train = standardize(train_images, mean, std, config.model)
        self.x_test = standardize(test_images, mean, std, config.model)
        self.y_train, self.y_test = asarray(train_labels), asarray(test_labels)
        self.background = -mean / std  # a black pixel, standardized

        self.config = config
        self.model = build_classifier(config, self.x_train)
        self.model.config.update(dataset=config.dataset, mean=mean, std=std)
        self.model.flatten_parameters()  # before the replicas and the optimizer: their passes take whole runs
        self.loss_fn = CrossEntropyLoss()
        on_cpu = xp.__name__ == "numpy"  # threads share one GPU to no gain: one replica there
        self.parallel = DataParallel(self.model, self.loss_fn, getattr(config, "replicas", 1) if on_cpu else 1)
        self.optimizer = make_optimizer(config, self.model)
        self.steps_per_epoch = math.ceil(len(self.x_train) / self.global_batch)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.schedule = make_schedule(config, self.total_steps)
        self.generators = {**model_generators(self.model), **self.parallel.generators()}
        if getattr(config, "augment", False):
            self.augment_rng = numpy.random.default_rng([config.seed, 3])
            self.generators["augment"] = self.augment_rng
        self.grads = [grad for _, grad in self.model.named_grads()]  # the same arrays every step
        self.plot_title = f"{config.model.upper()} on {config.dataset}"
        self.result: dict = {}
        self._epoch, self._batches = None, None
        log(f"{config.model} {self.model.config['hidden']} on {config.dataset}: {self.model.num_parameters():,} parameters, "
            f"{self.total_steps} steps of {config.batch_size}")

    def epoch(self, step: int) -> int:
        """The epoch (from 1) that step ``step`` (after ``step`` updates) belongs to."""
        return max(1, math.ceil(step / self.steps_per_epoch))

    def batch(self, step: int):
        epoch, done = divmod(step, self.steps_per_epoch)
        if self._epoch != epoch + 1:
            order = numpy.random.default_rng([self.config.seed, epoch + 1])
            batches = minibatches(self.x_train, self.y_train, self.global_batch, rng=order)
            self._epoch, self._batches = epoch + 1, itertools.islice(batches, done, None)
        return next(self._batches)

    def forward_backward(self, step: int, micro: int = 0) -> float:
        r"""Micro-step ``micro`` of step ``step`` on this rank's shard, weighted by its share of the step's rows.

        The weight $w = N n / n_{\mathrm{step}}$ ($n$ rows of the step's
        $n_{\mathrm{step}}$, $N$ ranks) multiplies the loss and its gradient;
        averaged over the ranks, the sum over micro-steps is the mean over the
        global batch (:mod:`mnn.distributed`, Eq. 1). 1 in one process
        without accumulation.
        """
        if micro == 0:
            self._step_rows = self.batch(step)
        x, y = self._step_rows
        weight, ranks = 1.0, self.world.size
        if ranks > 1 or self.config.grad_accum > 1:
            mine = shard(len(x), micro * ranks + self.world.rank, ranks * self.config.grad_accum)
            weight = ranks * (mine.stop - mine.start) / len(x)
            x, y = x[mine], y[mine]
            if len(x) == 0:  # an epoch's last global batch, if smaller than the number of shards
                return 0.0
        if "augment" in self.generators:
            x = shift_and_flip(x, self.background, self.augment_rng)
        if self.parallel.replicas > 1:
            return self.parallel.forward_backward(x, y, weight)
        loss = read_scalar(self.loss_fn.forward(self.model.forward(x), y))  # with the device's input checks
        if math.isfinite(loss):
            self.model.backward(self.loss_fn.backward(weight))
        return loss * weight

    def gradient_norm(self) -> float:
        return grad_norm(self.grads)

    def discard_step(self) -> None:
        self.loss_fn.cache = None

    def stretch(self, start: int, end: int) -> str:
        """Steps ``start + 1 .. end`` in words, for messages."""
        return f"epoch {self.epoch(end)}"

    def evaluation_due(self, step: int) -> bool:
        return step > 0 and (step % self.steps_per_epoch == 0 or step == self.total_steps)

    def evaluate(self, step: int) -> dict:
        return {"test_acc": accuracy(self.model, self.x_test, self.y_test)}

    def evaluation_line(self, step: int, metrics: dict, ms_per_step: float) -> str:
        return f"epoch {self.epoch(step)} | step {step} | test_acc {metrics['test_acc']:.4f}"

    def row_extras(self, step: int) -> dict:
        return {"epoch": self.epoch(step)}

    def after_evaluation(self, step: int, metrics: dict) -> None:
        self.result = {"test_acc": metrics["test_acc"], "steps": step}

    def state(self, step: int) -> dict:
        epoch, done = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch + 1, "batches_done": done, "result": self.result}

    def load_state(self, state: dict, step: int) -> None:
        if "epoch" in state and step != self.steps_per_epoch * (state["epoch"] - 1) + state["batches_done"]:
            raise CheckpointError(f"step {step} does not match epoch {state['epoch']}, batch {state['batches_done']} "
                                  f"of {self.steps_per_epoch} (was the data or the batch size changed?)")
        self.result = {key: value for key, value in state.get("result", {}).items() if key != "loss"}

    def check_resume(self, metadata: dict, path) -> None:
        pass

    def checkpoint_metadata(self) -> dict:
        return {}

    def weights_note(self) -> str:
        return ""

    def finish(self, stopped: bool) -> None:
        self.parallel.close()
        settings = dataclasses.asdict(self.config)
        path = save_model(Path(self.config.out) / WEIGHTS_NAME, self.model, train_config=settings)
        log(f"saved {path}" + (" (the weights at the stop)" if stopped else ""))

    def result_of(self, step: int, last_loss, ms_per_step: float) -> dict:
        return {**self.result, "loss": last_loss, "steps": step}


def train_classifier(config, resume=None) -> dict:
    """Train the model ``config`` names (an :class:`MLPTrainConfig` or a :class:`CNNTrainConfig`), evaluate after every epoch, save ``model.safetensors`` and the history in ``config.out``.

    A full checkpoint (``checkpoint.safetensors``: weights, optimizer state,
    position, dropout generators, history) is written after every epoch, every
    ``checkpoint_interval`` steps if set, and when SIGINT or SIGTERM arrives;
    then the run stops cleanly and ``train_classifier(config, resume=config.out)``
    continues it exactly, to bitwise-identical weights.

    A non-finite loss or gradient stops the run with :class:`~mnn.errors.TrainingError`
    (the last checkpoint is kept), or is skipped with ``skip_nonfinite``.

    Returns:
        ``{"test_acc": ..., "loss": ..., "steps": ...}`` of the final epoch, and
        ``"interrupted": True`` when a signal stopped the run.
    """
    return run(ClassifierTask(config), resume=resume)


train_mlp = train_cnn = train_classifier  # the names of the commands: mnn train mlp, mnn train cnn


def evaluate_file(path, data_dir=None) -> float:
    """Test accuracy of a saved MLP or CNN on the dataset it was trained on."""
    model, metadata = load_model(path)
    config = metadata["config"]
    kind = model_kind(config)
    if kind not in ("mlp", "cnn"):
        hint = ": use mnn sample" if kind in ("gpt", "char-rnn") else ""
        raise DataError(f"{path}: a {kind} model, not an image classifier{hint}")
    test_images, test_labels = load_vision_dataset(config["dataset"], data_dir=data_dir)["test"]
    images = standardize(test_images, config["mean"], config["std"], kind)
    return accuracy(model, images, asarray(test_labels))
