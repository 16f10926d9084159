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

# The subpackages load on first use, so ``import mnn`` stays light and ``mnn.io``,
# ``mnn.layers``, ... work without importing each (PEP 562).
_SUBPACKAGES = ("data", "io", "layers", "losses", "models", "optim", "parallel", "train")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"mnn.{name}")
    raise AttributeError(f"module 'mnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))
