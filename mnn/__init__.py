"""mnn, Manual Neural Networks: every forward and backward pass derived and written by hand."""

__version__ = "0.1.0"

from mnn.backend import set_default_dtype, use  # noqa: F401
from mnn.errors import (  # noqa: F401
    CheckpointError,
    DataError,
    InputError,
    MnnError,
    ShapeError,
    TrainingError,
)
from mnn.gradcheck import GradcheckError, gradcheck  # noqa: F401
from mnn.module import Module, ModuleList, Sequential, grad_enabled, no_grad  # noqa: F401
