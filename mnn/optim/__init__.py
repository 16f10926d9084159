"""Optimizers (SGD, Adam, AdamW), gradient clipping and learning-rate schedules.

``optimizer`` holds the base class, the parameter groups and clipping;
``sgd`` and ``adam`` one update rule each; ``schedules`` the learning rate
as a function of the step.
"""

from mnn.optim.adam import Adam, AdamW
from mnn.optim.optimizer import Optimizer, clip_grad_norm, grad_norm, param_groups
from mnn.optim.schedules import (
           Constant,
           Schedule,
           StepDecay,
           WarmupCosine,
           schedule_from_config,
)
from mnn.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Constant", "Optimizer", "Schedule", "StepDecay", "WarmupCosine",
           "clip_grad_norm", "grad_norm", "param_groups", "schedule_from_config"]
