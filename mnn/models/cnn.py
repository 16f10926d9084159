"""A small convolutional classifier: ``conv3x3 -> BatchNorm2d -> ReLU -> MaxPool2d(2)`` blocks, then two ``Linear``."""

from __future__ import annotations

import numpy

from mnn.layers import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from mnn.module import Sequential


class CNN(Sequential):
    """The network most people train first on images, in ``torch.nn.Sequential``'s order and names.

    For ``channels=(32, 64)`` on 28x28 images::

        0 Conv2d(1, 32, 3, padding=1, bias=False)   1 BatchNorm2d(32)   2 ReLU   3 MaxPool2d(2)   -> (32, 14, 14)
        4 Conv2d(32, 64, 3, padding=1, bias=False)  5 BatchNorm2d(64)   6 ReLU   7 MaxPool2d(2)   -> (64, 7, 7)
        8 Flatten   9 Linear(3136, 128)   10 ReLU   [11 Dropout]   11|12 Linear(128, 10)

    The convolutions have no bias: the BatchNorm after each subtracts the
    channel mean, which would cancel it. The first is built with
    ``input_grad=False``: its input is the data, whose gradient nothing uses
    (``backward`` returns ``None``), as the first ``Linear`` of :class:`~mnn.models.mlp.MLP`. The state dict (``0.weight``,
    ``1.running_mean``, ``9.weight``, ...) loads strictly into the same
    layers written as a ``torch.nn.Sequential``.

    Args:
        in_channels: image channels (1 for Fashion-MNIST).
        image_size: height and width of the square images.
        channels: output channels of each block; each block halves the size.
        hidden: the width of the hidden ``Linear``.
        num_classes: output size (logits).
        dropout: drop probability before the last ``Linear`` (0 for none).
        seed: seeds the initialisation and the dropout masks.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, channels=(32, 64), hidden: int = 128,
                 num_classes: int = 10, dropout: float = 0.0, seed: int = 0) -> None:
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1 or min(in_channels, hidden, num_classes) < 1:
            raise ValueError(f"CNN: sizes must be positive, got channels {channels}, hidden {hidden}, "
                             f"in_channels {in_channels}, num_classes {num_classes}")
        if image_size >> len(channels) < 1:
            raise ValueError(f"CNN: {len(channels)} blocks halve a {image_size}-pixel image to nothing")
        rng = numpy.random.default_rng(seed)
        layers, size, previous = [], image_size, in_channels
        for width in channels:
            first = not layers  # fed with data: its input gradient is never used
            layers += [Conv2d(previous, width, 3, padding=1, bias=False, rng=rng, input_grad=not first),
                       BatchNorm2d(width), ReLU(), MaxPool2d(2)]
            previous, size = width, size // 2
        layers += [Flatten(), Linear(previous * size * size, hidden, rng=rng), ReLU()]
        if dropout > 0:
            layers.append(Dropout(dropout, rng=numpy.random.default_rng([seed, len(layers)])))
        layers.append(Linear(hidden, num_classes, rng=rng))
        super().__init__(*layers)
        self.config = {"kind": "cnn", "in_channels": in_channels, "image_size": image_size, "channels": channels,
                       "hidden": hidden, "num_classes": num_classes, "dropout": dropout, "seed": seed}
