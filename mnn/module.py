r"""The contract every layer keeps, and the containers that compose layers.

A layer is a :class:`Module`:

* configuration is fixed in ``__init__``;
* ``params`` and ``grads`` are dicts with the same keys (``"weight"``, ``"bias"``);
* ``forward(x)`` computes the output and stores exactly what backward needs in
  ``self.cache``;
* ``backward(dy)`` reads the cache, checks ``dy`` has the output's shape
  (:func:`check_output_grad`), **accumulates** parameter gradients
  (``self.grads[k] += ...``), releases the cache and returns ``dx``.

Because gradients accumulate, call :meth:`Module.zero_grad` once per step.
Forward passes under :func:`no_grad` (evaluation, sampling) keep nothing for
a backward: ``self.cache`` stores nothing there, and GELU and LayerNorm also
skip the work their cache would have needed.
Tied weights are one shared array (and one shared gradient array) in two
modules, so both gradient contributions land in the same buffer.

Buffers (``self.buffers``, :meth:`Module.add_buffer`) are state that is not
learned by gradient, such as BatchNorm's running statistics: they are in
``state_dict()`` (PyTorch's names, after the module's parameters, as in
PyTorch) and loaded strictly, but never listed by ``named_parameters`` or
``named_grads``, so no optimizer and no weight decay touches them.

Containers (:class:`Sequential`, :class:`ModuleList`, and any module holding
sub-modules as attributes) name parameters with dots, as PyTorch does:
``transformer.h.0.attn.c_attn.weight``.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator

import numpy

from mnn.backend import xp
from mnn.errors import CheckpointError, ShapeError

_grad_enabled = True  # process-wide, so that DataParallel's replica threads see what the caller set


def grad_enabled() -> bool:
    """False inside :func:`no_grad`: forward passes need not keep anything for a backward."""
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Forward passes inside keep nothing for a backward, as under ``torch.no_grad()``: less memory, less work.

    This is separate from evaluation mode (:meth:`Module.eval`), which only
    changes what layers compute (no dropout): a model in evaluation mode still
    backpropagates, as in PyTorch. Inside, :attr:`Module.cache` stores nothing
    (so no activation outlives its use and nothing needs releasing), and GELU
    and LayerNorm write only their output; a backward after such a forward
    raises an error naming ``no_grad``. The setting is process-wide, not per
    thread.
    """
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


class Module:
    """Base class of all layers, losses and models."""

    def __init__(self) -> None:
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}
        self.training = True
        self.cache = None

    @property
    def cache(self):
        """What forward kept for backward (``None`` when nothing is kept)."""
        return self._cache

    @cache.setter
    def cache(self, value) -> None:
        self._cache = value if _grad_enabled else None  # under no_grad nothing is kept for a backward

    # -- the two passes -------------------------------------------------
    def forward(self, *inputs):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, *inputs):
        return self.forward(*inputs)

    def pop_cache(self):
        """Return the forward cache and release it; an error if forward did not run."""
        cache = self.cache
        if cache is None:
            raise RuntimeError(f"{self!r}: backward called without a forward, twice, or after a forward under "
                               "mnn.no_grad() (which keeps nothing for a backward)")
        self.cache = None
        return cache

    # -- parameters ------------------------------------------------------
    def add_parameter(self, name: str, value) -> None:
        """Register ``value`` as a parameter with a zeroed gradient of the same shape."""
        self.params[name] = value
        self.grads[name] = xp.zeros_like(value)

    def add_buffer(self, name: str, value) -> None:
        """Register ``value`` as a buffer: saved and loaded with the state dict, not a parameter, no gradient."""
        self.buffers[name] = value

    def tie_parameter(self, name: str, owner: "Module", owner_name: str) -> None:
        """Share ``owner.params[owner_name]`` (and its gradient buffer) as ``self.params[name]``."""
        self.params[name] = owner.params[owner_name]
        self.grads[name] = owner.grads[owner_name]

    def children(self) -> Iterator[tuple[str, "Module"]]:
        """Direct sub-modules, in the order they were assigned."""
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self.children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def _named(self, which: str, unique: bool) -> Iterator[tuple[str, object]]:
        seen = set()
        for prefix, module in self.named_modules():
            for key, value in getattr(module, which).items():
                if unique:
                    if id(value) in seen:
                        continue
                    seen.add(id(value))
                yield (f"{prefix}.{key}" if prefix else key), value

    def named_parameters(self) -> list[tuple[str, object]]:
        """``(dotted name, array)`` for every parameter, tied arrays listed once."""
        return list(self._named("params", unique=True))

    def named_grads(self) -> list[tuple[str, object]]:
        """``(dotted name, gradient array)`` in the same order as :meth:`named_parameters`."""
        return list(self._named("grads", unique=True))

    def named_buffers(self) -> list[tuple[str, object]]:
        """``(dotted name, array)`` for every buffer (running statistics), as ``torch.nn.Module.named_buffers``."""
        return list(self._named("buffers", unique=True))

    def flatten_parameters(self) -> None:
        """Move every parameter into one contiguous buffer, and every gradient into another, in place of the arrays.

        Matrices come first and vectors after (``ndim >= 2``, then the rest:
        the two groups of :func:`~mnn.optim.param_groups`), each in the order
        of :meth:`named_parameters`; tied parameters stay tied. The values are
        kept. What then passes over all of them, an optimizer's update, the
        zeroing, the clipping, the sum of :class:`~mnn.parallel.DataParallel`'s
        replicas, makes one call per run of a few hundred thousand numbers
        instead of one per array (:func:`mnn.threads.runs`), with the same bits.

        On the CPU the parameters' buffer is an anonymous shared mapping
        (``mmap``): :class:`~mnn.parallel.DataParallel`'s replica processes,
        forked from this one, then read the weights where the optimizer
        writes them, with no copy before each pass. (Any process forked
        afterwards shares them the same way: what it writes there, this one
        sees.)

        Call it before building an optimizer or a ``DataParallel``: they hold
        the arrays, and the arrays this replaces become read-only, so an
        optimizer built earlier fails on its first step instead of updating
        arrays the model no longer uses. (As ``torch.nn.RNN.flatten_parameters``
        does for cuDNN, but for every module.)
        """
        named = list(zip(self.named_parameters(), self.named_grads()))
        named.sort(key=lambda item: item[0][1].ndim < 2)  # stable: matrices, then vectors, each in model order
        dtypes = {param.dtype for (_, param), _ in named}
        if len(dtypes) > 1:
            raise ValueError(f"flatten_parameters: parameters of one dtype only, got {sorted(map(str, dtypes))}")
        total = sum(int(param.size) for (_, param), _ in named)
        if not total:
            return
        dtype = dtypes.pop()
        if isinstance(named[0][0][1], numpy.ndarray):  # shared with forked processes (see above)
            params = numpy.frombuffer(mmap.mmap(-1, total * dtype.itemsize), dtype, total)
        else:
            params = xp.empty(total, dtype)
        grads, moved, offset = xp.empty(total, dtype), {}, 0
        for (_, param), (_, grad) in named:
            size = int(param.size)
            moved[id(param)] = params[offset: offset + size].reshape(param.shape)
            moved[id(grad)] = grads[offset: offset + size].reshape(grad.shape)
            moved[id(param)][...] = param
            moved[id(grad)][...] = grad
            offset += size
        for _, module in self.named_modules():
            for table in (module.params, module.grads):
                for key, array in table.items():
                    if id(array) in moved:
                        table[key] = moved[id(array)]
        for (_, param), (_, grad) in named:
            if isinstance(param, numpy.ndarray):
                param.flags.writeable = False  # an optimizer built before this fails instead of updating it
                grad.flags.writeable = False

    def num_parameters(self) -> int:
        return sum(int(p.size) for _, p in self.named_parameters())

    # -- accounting --------------------------------------------------------
    def flops(self, *input_shapes) -> tuple[int, int]:
        """Matrix-product FLOPs of this module's own forward and backward for inputs of these shapes.

        A layer with matrix products states their count in its docstring beside the
        equations it counts, and overrides this; element-wise layers, gathers and
        containers (whose sub-modules count their own) keep the default ``(0, 0)``.
        """
        return 0, 0

    def gradient_temporary_bytes(self) -> int:
        """Bytes this module's backward holds for its parameters' gradients before adding them in (``dW`` before
        ``+=``): the parameters' size by default (for :mod:`mnn.summary`'s peak)."""
        return sum(int(param.nbytes) for param in self.params.values())

    def summary(self, batch_shape, dtype=None):
        """Parameters, FLOPs per pass and cached bytes, layer by layer: :func:`mnn.summary.summary`."""
        from mnn.summary import summary  # noqa: PLC0415 - the accounting imports containers, not the reverse

        return summary(self, batch_shape, dtype)

    def release_caches(self) -> None:
        """Drop the forward cache of this module and every sub-module (after a forward with no backward)."""
        for _, module in self.named_modules():
            module.cache = None

    def zero_grad(self) -> None:
        for _, grad in self.named_grads():
            grad.fill(0)

    def train(self, mode: bool = True) -> "Module":
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # -- state dicts -----------------------------------------------------
    def state_dict(self) -> dict:
        """Every parameter and buffer by dotted name, module by module, parameters first (PyTorch's order).

        Tied arrays appear under each name (as in PyTorch).
        """
        state = {}
        for prefix, module in self.named_modules():
            for key, value in [*module.params.items(), *module.buffers.items()]:
                state[f"{prefix}.{key}" if prefix else key] = value
        return state

    def load_state_dict(self, state: dict) -> None:
        """Copy ``state`` into the parameters, in place, strictly.

        Every check runs before anything is copied, so a refused state dict
        leaves the model untouched.

        Raises:
            CheckpointError: naming every missing, unexpected or mis-shaped entry.
        """
        own = self.state_dict()
        check_state(type(self).__name__, own, state)
        for name, param in own.items():
            param[...] = xp.asarray(state[name], dtype=param.dtype)  # in place: buffers of 0-d included

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def check_state(owner: str, own: dict, state: dict, shape_free=(), other_problems=()) -> None:
    """Refuse a state dict unless it has exactly the keys of ``own`` (plus ``shape_free``) and their shapes.

    Args:
        owner: the class name the message starts with.
        own: the entries expected, by name, with the shapes expected.
        state: the entries offered.
        shape_free: names that must also be present but whose shape the caller checks.
        other_problems: messages the caller found, reported with the rest.

    Raises:
        CheckpointError: naming every missing, unexpected and mis-shaped entry at once.
    """
    missing = [k for k in [*shape_free, *own] if k not in state]
    unexpected = [k for k in state if k not in own and k not in shape_free]
    mis_shaped = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    mis_shaped += list(other_problems)
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected))
    if mis_shaped:
        problems.append("wrong shape " + "; ".join(mis_shaped))
    if problems:
        raise CheckpointError(f"{owner}.load_state_dict: " + " | ".join(problems))


def check_input(layer: Module, x, last_dim: int | None = None, min_ndim: int = 1, ndim: int | None = None) -> None:
    """Refuse an input of the wrong rank or feature size, naming the layer and both shapes.

    Raises:
        ShapeError: e.g. ``Linear(784, 256): expected input (..., 784), got (64, 100)``.
    """
    shape = tuple(getattr(x, "shape", ()))
    wanted = ("..., " if ndim is None else "") + (str(last_dim) if last_dim is not None else "features")
    if ndim is not None and len(shape) != ndim:
        raise ShapeError(f"{layer!r}: expected a {ndim}-D input, got shape {shape}")
    if len(shape) < min_ndim:
        raise ShapeError(f"{layer!r}: expected input ({wanted}) with at least {min_ndim} dims, got shape {shape}")
    if last_dim is not None and shape[-1] != last_dim:
        raise ShapeError(f"{layer!r}: expected input ({wanted}), got shape {shape}")


def check_output_grad(layer: Module, dy, shape: tuple) -> None:
    """Refuse an upstream gradient whose shape is not the forward output's, naming the layer and both shapes.

    Called first in ``backward`` (one tuple comparison): a mis-shaped ``dy``
    would otherwise fail deep inside a reshape, broadcast silently into a
    wrong gradient, or be read out of bounds by a compiled loop.

    Raises:
        ShapeError: e.g. ``Linear(4, 10, bias=True): backward expected dy of the output's shape (7, 10), got (7, 4)``.
    """
    if getattr(dy, "shape", None) != shape:
        raise ShapeError(f"{layer!r}: backward expected dy of the output's shape {tuple(shape)}, "
                         f"got {tuple(getattr(dy, 'shape', ()))}")


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse. Children are named ``0, 1, ...``."""

    def __init__(self, *layers: Module) -> None:
        super().__init__()
        self.layers = list(layers)

    def children(self):
        for index, layer in enumerate(self.layers):
            yield str(index), layer

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def __getitem__(self, index: int) -> Module:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        inner = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"


class ModuleList(Module):
    """A list of modules named ``0, 1, ...`` (no forward of its own), like ``torch.nn.ModuleList``."""

    def __init__(self, modules) -> None:
        super().__init__()
        self.items = list(modules)

    def children(self):
        for index, module in enumerate(self.items):
            yield str(index), module

    def __getitem__(self, index: int) -> Module:
        return self.items[index]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)
