"""The multi-layer perceptron: ``Linear -> activation [-> Dropout]`` per hidden size, then ``Linear``."""

from __future__ import annotations

import numpy

from mnn.layers import Dropout, Linear, ReLU, Sigmoid, Tanh
from mnn.module import Sequential

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}


class MLP(Sequential):
    """A multi-layer perceptron: ``Linear -> activation [-> Dropout]`` per hidden size, then ``Linear``.

    Parameter names follow ``torch.nn.Sequential``: ``0.weight``, ``0.bias``,
    ``2.weight``, ... so a state dict moves to an equivalent PyTorch model as is.

    Args:
        in_features: input size (784 for 28x28 images).
        hidden: the hidden layer sizes, e.g. ``(256,)`` or ``(1024, 1024)``.
        num_classes: output size (logits; the loss applies the softmax).
        activation: ``"relu"``, ``"tanh"`` or ``"sigmoid"``.
        dropout: drop probability after each hidden activation (0 for none).
        seed: seeds the initialisation and the dropout masks.
    """

    def __init__(self, in_features: int = 784, hidden=(256,), num_classes: int = 10,
                 activation: str = "relu", dropout: float = 0.0, seed: int = 0) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        hidden = [int(h) for h in hidden]
        if any(h < 1 for h in hidden) or in_features < 1 or num_classes < 1:
            raise ValueError(f"MLP: layer sizes must be positive, got {in_features}, {hidden}, {num_classes}")
        rng = numpy.random.default_rng(seed)
        layers = []
        sizes = [in_features, *hidden]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            # The first layer's input is data: nothing needs its gradient.
            layers += [Linear(fan_in, fan_out, rng=rng, input_grad=bool(layers)), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(Dropout(dropout, rng=numpy.random.default_rng([seed, len(layers)])))
        layers.append(Linear(sizes[-1], num_classes, rng=rng))
        super().__init__(*layers)
        self.config = {"kind": "mlp", "in_features": in_features, "hidden": hidden,
                       "num_classes": num_classes, "activation": activation, "dropout": dropout, "seed": seed}
