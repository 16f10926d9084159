r"""The exercises: which layer, which method the student writes, how hard, which chapter, and a random case.

Each :class:`Exercise` names a class of mnn by its defining module, so that
the skeleton (:mod:`mnn.exercises.skeleton`) is cut from mnn's own source and
the check (:mod:`mnn.exercises.check`) compares with mnn's own layer. A case
draws random shapes (distinct sizes, so that a transposed or averaged
gradient cannot hide behind equal dimensions) and float64 inputs away from
kinks and ties, and builds the layer with random parameters where a default
(``gamma = 1``, ``beta = 0``) would make a wrong gradient look right.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import numpy

# The difficulty scale, as ``mnn exercise list`` shows it.
DIFFICULTIES = {1: "easy", 2: "medium", 3: "hard"}


@dataclass(frozen=True)
class Case:
    """One random instance: ``layer_args`` for the constructor, the forward's ``inputs``, and their names."""
    text: str
    layer_args: tuple
    layer_kwargs: dict
    inputs: tuple
    input_names: tuple
    prepare: Callable | None = None  # called on every built layer with an rng (random gamma and beta)


@dataclass(frozen=True)
class Exercise:
    """One layer to write the backward of.

    Attributes:
        name: the class name, also the exercise's name (``mnn exercise start Linear``).
        module: the module that defines the class (``mnn.layers.linear``).
        difficulty: 1 (easy), 2 (medium) or 3 (hard).
        chapter: the title of its step of the learning path.
        make_case: ``make_case(rng, trial)`` -> a random :class:`Case` (``trial`` counts the cases of one check).
        kind: ``"layer"`` (``backward(dy)``), ``"loss"`` (``backward(dloss)``, a scalar) or
            ``"recurrent"`` (``forward(x, state)``, ``backward(doutput, dstate)``).
        write: the methods the student writes (their bodies are removed).
        drop: helper methods of the backward that the skeleton leaves out altogether.
        summary: what the exercise teaches, in one line.
    """
    name: str
    module: str
    difficulty: int
    chapter: str
    make_case: Callable
    summary: str
    kind: str = "layer"
    write: tuple = ("backward",)
    drop: tuple = ()
    extra: dict = field(default_factory=dict)

    def reference(self):
        """mnn's own class."""
        return getattr(importlib.import_module(self.module), self.name)

    @property
    def file_name(self) -> str:
        """The file ``mnn exercise start`` writes: ``linear.py``, ``crossentropyloss.py``."""
        return f"{self.name.lower()}.py"


def _sizes(rng, count: int, low: int = 2, high: int = 7) -> list[int]:
    """``count`` distinct sizes in ``[low, high]``: no two dimensions can be confused."""
    return [int(v) for v in rng.choice(numpy.arange(low, high + 1), size=count, replace=False)]


def _away_from_zero(rng, shape, margin: float = 0.1):
    x = rng.standard_normal(shape)
    return numpy.sign(x) * (margin + numpy.abs(x))


def _random_affine(layer, rng) -> None:
    """Random scale and shift: at ``gamma = 1``, ``beta = 0`` a forgotten ``gamma`` would go unseen."""
    layer.params["weight"][...] = rng.uniform(0.5, 1.5, layer.params["weight"].shape)
    if "bias" in layer.params:
        layer.params["bias"][...] = rng.standard_normal(layer.params["bias"].shape)


def _elementwise(margin: bool = False):
    def make(rng, trial: int = 0):
        a, b, c = _sizes(rng, 3)
        x = _away_from_zero(rng, (a, b, c)) if margin else rng.standard_normal((a, b, c))
        return Case(f"x {(a, b, c)}", (), {}, (x,), ("x",))
    return make


def _linear(rng, trial: int = 0):
    B, T, n, m = _sizes(rng, 4)
    return Case(f"Linear({n}, {m}), x {(B, T, n)}", (n, m), {"rng": rng}, (rng.standard_normal((B, T, n)),), ("x",))


def _rows(rng, trial: int = 0):
    a, b, c = _sizes(rng, 3)
    return Case(f"x {(a, b, c)}", (), {}, (rng.standard_normal((a, b, c)),), ("x",))


def _class_loss(log_probabilities: bool):
    def make(rng, trial: int = 0):
        a, b, C = _sizes(rng, 3)
        scores = rng.standard_normal((a, b, C))
        if log_probabilities:
            scores = scores - numpy.log(numpy.exp(scores).sum(-1, keepdims=True))
        labels = rng.integers(0, C, (a, b))
        return Case(f"scores {(a, b, C)}, labels {(a, b)}", (), {}, (scores, labels), ("scores", "labels"))
    return make


def _mse(rng, trial: int = 0):
    a, b = _sizes(rng, 2)
    shape = (a, b)
    return Case(f"prediction and target {shape}", (), {}, (rng.standard_normal(shape), rng.standard_normal(shape)),
                ("prediction", "target"))


def _matrix_product(rng, trial: int = 0):
    b, n, k, m = _sizes(rng, 4)
    return Case(f"Q {(b, n, k)}, P {(b, k, m)}", (), {}, (rng.standard_normal((b, n, k)),
                                                          rng.standard_normal((b, k, m))), ("Q", "P"))


def _embedding(rng, trial: int = 0):
    V, C, a, b = _sizes(rng, 4, 2, 8)
    ids = rng.integers(0, V, (a, b))  # repeated ids: their gradient rows must add up
    return Case(f"Embedding({V}, {C}), ids {(a, b)}", (V, C), {"rng": rng}, (ids,), ("ids",))


def _layer_norm(rng, trial: int = 0):
    a, b, C = _sizes(rng, 3)
    return Case(f"LayerNorm({C}), random gamma and beta, x {(a, b, C)}", (C,), {},
                (rng.standard_normal((a, b, C)),), ("x",), _random_affine)


def _attention(rng, trial: int = 0):
    B, T = _sizes(rng, 2, 2, 4)
    NH, hs = [int(v) for v in rng.choice([(2, 3), (3, 2), (2, 2)], 1)[0]]
    C = NH * hs
    return Case(f"MultiHeadAttention({C}, {NH}), causal, x {(B, T, C)}", (C, NH), {"rng": rng},
                (rng.standard_normal((B, T, C)),), ("x",))


def _conv(rng, trial: int = 0):
    N, C_in, C_out = _sizes(rng, 3, 1, 4)
    H, W = _sizes(rng, 2, 4, 7)
    stride, padding = int(rng.integers(1, 3)), int(rng.integers(0, 2))
    return Case(f"Conv2d({C_in}, {C_out}, 3, stride={stride}, padding={padding}), x {(N, C_in, H, W)}",
                (C_in, C_out, 3), {"stride": stride, "padding": padding, "rng": rng},
                (rng.standard_normal((N, C_in, H, W)),), ("x",))


def _max_pool(rng, trial: int = 0):
    N, C = _sizes(rng, 2, 1, 3)
    H, W = 2 * numpy.array(_sizes(rng, 2, 2, 4))
    shape = (N, C, int(H), int(W))
    size = int(numpy.prod(shape))
    x = (rng.permutation(size).reshape(shape) - size / 2) * (4.0 / size)  # distinct values, no ties within eps
    return Case(f"MaxPool2d(2), x {shape}, no ties", (2,), {}, (x,), ("x",))


def _batch_norm(rng, trial: int = 0):
    N, C, H, W = _sizes(rng, 4, 2, 5)
    return Case(f"BatchNorm2d({C}), training, random gamma and beta, x {(N, C, H, W)}", (C,), {},
                (rng.standard_normal((N, C, H, W)),), ("x",), _random_affine)


def _recurrent(name: str, states: int):
    def make(rng, trial: int = 0):
        """The first case is one step of one layer (the cell alone); the next ones go through time and layers."""
        T, B, n, H = _sizes(rng, 4, 2, 5)
        T, layers = (1, 1) if trial == 0 else (T + 1, int(rng.integers(1, 3)))
        state = tuple(rng.standard_normal((layers, B, H)) for _ in range(states))
        steps = "one step (the cell alone)" if T == 1 else "through time"
        names = ("h0", "c0")[:states]
        return Case(f"{name}({n}, {H}, num_layers={layers}), {steps}, x {(T, B, n)}, {' and '.join(names)} "
                    f"{(layers, B, H)}", (n, H), {"num_layers": layers, "rng": rng},
                    (rng.standard_normal((T, B, n)), *state), ("x", *names))
    return make


def _pool(rng, trial: int = 0):
    N, C, H, W = _sizes(rng, 4, 2, 7)
    return Case(f"x {(N, C, H, W)}", (), {}, (rng.standard_normal((N, C, H, W)),), ("x",))


def _positive(rng, trial: int = 0):
    a, b = _sizes(rng, 2)
    return Case(f"x {(a, b)} in [0.5, 2]", (), {}, (rng.uniform(0.5, 2.0, (a, b)),), ("x",))


def _prelu(rng, trial: int = 0):
    N, C, L = _sizes(rng, 3)
    x = _away_from_zero(rng, (N, C, L))
    return Case(f"PReLU({C}), random slopes, x {(N, C, L)}", (C,), {}, (x,), ("x",),
                lambda layer, rng: layer.params["weight"].__setitem__(..., rng.uniform(0.05, 0.5, C)))


def _with_args(case: Case, args: tuple, kwargs: dict, text: str) -> Case:
    return Case(f"{text}, {case.text}", args, kwargs, case.inputs, case.input_names)


_TIME = ("right at time step {right}; wrong at {wrong}", None)
_GATES = ("right in the rows of gates {right}; wrong in those of {wrong}",)
L = "mnn.layers."
EXERCISES: list[Exercise] = [
    Exercise("Linear", L + "linear", 1, "Linear", _linear, "three matrix products; the weight's gradient sums the batch"),
    Exercise("ReLU", L + "activation", 1, "ReLU", _elementwise(margin=True), "a diagonal Jacobian: a mask",
             drop=()),
    Exercise("Sigmoid", L + "activation", 1, "ReLU", _elementwise(), "a derivative written with the output"),
    Exercise("Tanh", L + "activation", 1, "ReLU", _elementwise(), "a derivative written with the output"),
    Exercise("LeakyReLU", L + "activation", 1, "ReLU", _elementwise(margin=True), "a fixed slope below zero"),
    Exercise("ELU", L + "activation", 1, "ReLU", _elementwise(margin=True), "a derivative from the output"),
    Exercise("SiLU", L + "activation", 1, "ReLU", _elementwise(), "the product rule"),
    Exercise("Log", L + "activation", 1, "ReLU", _positive, "the simplest diagonal Jacobian"),
    Exercise("PReLU", L + "prelu", 1, "ReLU", _prelu, "a learnable slope per channel (the guide's layer)"),
    Exercise("MSELoss", "mnn.losses", 1, "Mean squared error", _mse, "the loss owns the mean", kind="loss"),
    Exercise("NLLLoss", "mnn.losses", 1, "Negative log-likelihood", _class_loss(True), "a scatter of -1/N",
             kind="loss"),
    Exercise("CrossEntropyLoss", "mnn.losses", 2, "Cross-entropy", _class_loss(False), "(softmax - onehot) / N",
             kind="loss"),
    Exercise("Softmax", L + "softmax", 2, "Softmax and LogSoftmax", _rows, "a full Jacobian, never built"),
    Exercise("LogSoftmax", L + "softmax", 2, "Softmax and LogSoftmax", _rows, "identity minus a rank-one term"),
    Exercise("MatrixProduct", L + "matmul", 2, "MatrixProduct", _matrix_product, "two inputs, two gradients"),
    Exercise("Conv2d", L + "conv", 3, "Convolution", _conv, "im2col's transpose: col2im adds back"),
    Exercise("MaxPool2d", L + "pooling", 2, "Pooling", _max_pool, "route the gradient to the maximum"),
    Exercise("AvgPool2d", L + "pooling", 2, "Pooling", lambda rng, trial=0: _with_args(_pool(rng), (3,),
             {"stride": 2, "padding": 1}, "AvgPool2d(3, stride=2, padding=1)"), "share the gradient out evenly"),
    Exercise("AdaptiveAvgPool2d", L + "pooling", 2, "Pooling", lambda rng, trial=0: _with_args(
             _pool(rng), (2,), {}, "AdaptiveAvgPool2d(2)"), "bins of uneven sizes"),
    Exercise("BatchNorm2d", L + "batchnorm", 3, "Batch normalisation", _batch_norm,
             "the gradient through the batch statistics"),
    Exercise("RNN", L + "elman", 2, "Recurrence", _recurrent("RNN", 1), "one tanh step, then through time",
             kind="recurrent", write=("_backward_direction",), extra={"locate": {"dx": _TIME}}),
    Exercise("LSTM", L + "lstm", 3, "Recurrence", _recurrent("LSTM", 2), "four gates, then backpropagation through "
             "time", kind="recurrent", write=("_backward_direction",),
             extra={"locate": {"dx": _TIME, "grads": (_GATES[0], "ifgo")}}),
    Exercise("GRU", L + "gru", 3, "Recurrence", _recurrent("GRU", 1), "a reset gate inside the candidate",
             kind="recurrent", write=("_backward_direction",),
             extra={"locate": {"dx": _TIME, "grads": (_GATES[0], "rzn")}}),
    Exercise("Embedding", L + "embedding", 2, "The char-rnn", _embedding, "a scatter-add of rows"),
    Exercise("MultiHeadAttention", L + "attention", 3, "Attention", _attention,
             "the backward of a composite layer, through its sub-layers"),
    Exercise("LayerNorm", L + "normalization", 3, "LayerNorm", _layer_norm, "a Jacobian that couples the row",
             drop=("_backward_compiled",)),
    Exercise("GELU", L + "gelu", 2, "GELU", _elementwise(), "product and chain rule on the tanh form"),
]


def find(name: str) -> Exercise:
    """The exercise called ``name`` (any case; ``linear.py`` too).

    Raises:
        KeyError: naming the exercises there are.
    """
    key = name.lower().removesuffix(".py")
    for exercise in EXERCISES:
        if key == exercise.name.lower():
            return exercise
    raise KeyError(f"no exercise called {name!r}; there are: {', '.join(e.name for e in EXERCISES)}")
