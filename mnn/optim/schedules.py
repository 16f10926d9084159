r"""Learning-rate schedules: small callables ``schedule(step) -> lr``.

A training loop sets the rate before each optimizer step::

    schedule = WarmupCosine(max_lr=6e-4, min_lr=6e-5, warmup_steps=100, decay_steps=5000)
    for step in range(max_steps):
        optimizer.lr = schedule(step)      # or schedule.lr_at(step)
        ...
        optimizer.step()

``step`` counts from 0. Every schedule has a :meth:`config` dict of plain
Python values (JSON-ready, so a checkpoint can store it) and
:func:`schedule_from_config` rebuilds it.
"""

from __future__ import annotations

import math

from mnn.errors import CheckpointError


class Schedule:
    """Base class: a learning rate as a function of the step number."""

    def lr_at(self, step: int) -> float:
        """The learning rate to use for optimizer step ``step`` (0-based)."""
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"{self!r}: step must be >= 0, got {step}")
        return self.lr_at(int(step))

    def config(self) -> dict:
        """``{"name": class name, **arguments}``: enough to rebuild the schedule."""
        return {"name": type(self).__name__, **self._arguments()}

    def _arguments(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self._arguments().items())
        return f"{type(self).__name__}({arguments})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Schedule) and self.config() == other.config()


class Constant(Schedule):
    r"""The same rate at every step:

    $$
    \eta_t = \eta. \tag{1}
    $$
    """

    def __init__(self, lr: float) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Constant: lr must be >= 0, got {lr}")
        self.lr = float(lr)

    def lr_at(self, step: int) -> float:
        return self.lr  # Eq. (1)

    def _arguments(self) -> dict:
        return {"lr": self.lr}


class StepDecay(Schedule):
    r"""Multiply the rate by $\gamma$ every ``step_size`` steps (``torch.optim.lr_scheduler.StepLR``):

    $$
    \eta_t = \eta\, \gamma^{\lfloor t / s \rfloor}. \tag{1}
    $$

    Args:
        lr: $\eta$, the rate of steps $0, \dots, s - 1$.
        step_size: $s \ge 1$.
        gamma: $\gamma$, usually in $(0, 1)$.
    """

    def __init__(self, lr: float, step_size: int, gamma: float) -> None:
        if not lr >= 0.0 or int(step_size) != step_size or step_size < 1 or not gamma >= 0.0:
            raise ValueError(f"StepDecay: need lr >= 0, integer step_size >= 1, gamma >= 0; "
                             f"got lr={lr}, step_size={step_size}, gamma={gamma}")
        self.lr, self.step_size, self.gamma = float(lr), int(step_size), float(gamma)

    def lr_at(self, step: int) -> float:
        return self.lr * self.gamma ** (step // self.step_size)  # Eq. (1)

    def _arguments(self) -> dict:
        return {"lr": self.lr, "step_size": self.step_size, "gamma": self.gamma}


class WarmupCosine(Schedule):
    r"""Linear warm-up, cosine decay, then a floor: nanoGPT's ``get_lr``.

    With maximum rate $\eta_{\max}$, floor $\eta_{\min}$, $W$ warm-up steps
    and decay ending at step $D$:

    $$
    \eta_t = \eta_{\max}\, \frac{t + 1}{W + 1}, \qquad t < W \tag{1}
    $$

    $$
    \eta_t = \eta_{\min} + \tfrac12 \big(1 + \cos(\pi r_t)\big)(\eta_{\max} - \eta_{\min}),
    \qquad r_t = \frac{t - W}{D - W}, \qquad W \le t \le D \tag{2}
    $$

    $$
    \eta_t = \eta_{\min}, \qquad t > D \text{ (or } t \ge W \text{ when } D \le W) \tag{3}
    $$

    The warm-up starts just above zero (never exactly 0, so step 0 moves the
    weights) and reaches $\eta_{\max}$ at $t = W$, where the cosine starts
    ($r = 0$); the cosine reaches $\eta_{\min}$ at $t = D$ ($r = 1$). A run
    shorter than its warm-up ($D \le W$, where nanoGPT would divide by zero
    at $t = W = D$) gets the floor once the warm-up is over.

    Args:
        max_lr: $\eta_{\max}$.
        min_lr: $\eta_{\min}$ (nanoGPT uses $\eta_{\max}/10$).
        warmup_steps: $W \ge 0$.
        decay_steps: $D \ge 0$, the step where the floor is reached (normally $D > W$).
    """

    def __init__(self, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> None:
        if not (max_lr >= 0.0 and min_lr >= 0.0):
            raise ValueError(f"WarmupCosine: rates must be >= 0, got max_lr={max_lr}, min_lr={min_lr}")
        if int(warmup_steps) != warmup_steps or int(decay_steps) != decay_steps or min(warmup_steps, decay_steps) < 0:
            raise ValueError(f"WarmupCosine: need integers warmup_steps >= 0 and decay_steps >= 0, "
                             f"got warmup_steps={warmup_steps}, decay_steps={decay_steps}")
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_steps, self.decay_steps = int(warmup_steps), int(decay_steps)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / (self.warmup_steps + 1)  # Eq. (1)
        if step > self.decay_steps or self.decay_steps <= self.warmup_steps:
            return self.min_lr  # Eq. (3)
        ratio = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)  # Eq. (2): r_t
        coefficient = 0.5 * (1.0 + math.cos(math.pi * ratio))  # Eq. (2)
        return self.min_lr + coefficient * (self.max_lr - self.min_lr)  # Eq. (2)

    def _arguments(self) -> dict:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps}


SCHEDULES = {cls.__name__: cls for cls in (Constant, StepDecay, WarmupCosine)}


def schedule_from_config(config: dict) -> Schedule:
    """Rebuild a schedule from its :meth:`Schedule.config` dict.

    Raises:
        CheckpointError: for an unknown ``"name"`` or arguments the schedule refuses.
    """
    config = dict(config)
    name = config.pop("name", None)
    if name not in SCHEDULES:
        raise CheckpointError(f"unknown learning-rate schedule {name!r}: expected one of {sorted(SCHEDULES)}")
    try:
        return SCHEDULES[name](**config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"bad configuration for schedule {name}: {error}") from error
