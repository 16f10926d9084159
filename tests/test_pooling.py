"""Pooling and Flatten: float64 finite differences (tie-free inputs for max), PyTorch parity, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_transformer import DTYPES, randn, rel
from torch import nn

import mnn
from mnn.errors import ShapeError
from mnn.layers import AdaptiveAvgPool2d, AvgPool2d, Conv2d, Flatten, MaxPool2d
from mnn.module import Sequential

# (layer, torch layer, input shape)
POOLS = [
    (lambda: MaxPool2d(2), lambda: nn.MaxPool2d(2), (2, 3, 6, 6)),
    (lambda: MaxPool2d(3, stride=2, padding=1), lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 2, 7, 6)),
    (lambda: MaxPool2d((2, 3), stride=1), lambda: nn.MaxPool2d((2, 3), stride=1), (1, 2, 5, 5)),
    (lambda: AvgPool2d(2), lambda: nn.AvgPool2d(2), (2, 3, 7, 6)),
    (lambda: AvgPool2d(3, stride=2, padding=1), lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 2, 7, 6)),
    (lambda: AdaptiveAvgPool2d(1), lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 5, 4)),
    (lambda: AdaptiveAvgPool2d((2, 3)), lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 3, 5, 7)),
    (lambda: Flatten(), lambda: nn.Flatten(), (2, 3, 4, 5)),
    (lambda: Flatten(0, 2), lambda: nn.Flatten(0, 2), (2, 3, 4, 5)),
    (lambda: MaxPool2d(2), lambda: nn.MaxPool2d(2), (2, 3, 7, 5)),  # odd sizes: the last row and column unpooled
]
WINDOWED = [0, 1, 2, 3, 4, 9]  # the cases with kernel windows (they keep the input's memory layout)


def tie_free(rng, shape, dtype=np.float64):
    """Distinct values 0.1 apart (shuffled): no window of a max pool holds two within the gradcheck's step."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1).astype(dtype)


def channels_last_identity(channels):
    """A 1x1 Conv2d holding the identity: passes its input on unchanged, in Conv2d's channels-last memory."""
    conv = Conv2d(channels, channels, 1, bias=False, dtype=np.float64)
    conv.params["weight"][...] = np.eye(channels).reshape(channels, channels, 1, 1)
    return conv


@pytest.mark.parametrize("case", range(len(POOLS)))
def test_pooling_gradcheck(case, compute_path):
    make, _, shape = POOLS[case]
    errors = mnn.gradcheck(make(), tie_free(np.random.default_rng(case), shape))
    assert max(errors.values()) <= 1e-7


@pytest.mark.parametrize("case", WINDOWED)
def test_pooling_gradcheck_on_channels_last_memory(case, compute_path):
    make, _, shape = POOLS[case]
    model = Sequential(channels_last_identity(shape[1]), make())
    errors = mnn.gradcheck(model, tie_free(np.random.default_rng(case), shape))
    assert max(errors.values()) <= 1e-7


@pytest.mark.parametrize("np_dtype, torch_dtype, tol", DTYPES)
@pytest.mark.parametrize("case", range(len(POOLS)))
def test_pooling_matches_pytorch(case, np_dtype, torch_dtype, tol, compute_path):
    make, make_torch, shape = POOLS[case]
    rng = np.random.default_rng(10 + case)
    x = randn(rng, shape, np_dtype)
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # as Conv2d returns
    for x_in in (x, channels_last):
        layer = make()
        y = layer.forward(x_in)
        dy = randn(rng, y.shape, np_dtype)
        dx = layer.backward(dy)
        xt = torch.tensor(x, requires_grad=True)
        yt = make_torch()(xt)
        yt.backward(torch.from_numpy(dy))
        assert y.dtype == np_dtype and dx.dtype == np_dtype and y.shape == tuple(yt.shape)
        assert rel(y, yt) <= tol and rel(dx, xt.grad) <= tol
        if x_in is channels_last and case in WINDOWED:  # the windowed pools keep the input's memory layout
            assert y.transpose(0, 2, 3, 1).flags.c_contiguous and dx.strides[1] == dx.itemsize


def test_max_pool_sends_each_window_gradient_to_its_first_maximum(compute_path):
    x = np.array([[[[1.0, 3.0], [3.0, 2.0]]]])
    layer = MaxPool2d(2)
    assert layer.forward(x).item() == 3.0
    np.testing.assert_array_equal(layer.backward(np.ones((1, 1, 1, 1))), [[[[0.0, 1.0], [0.0, 0.0]]]])


def test_flatten_gives_pytorch_order_for_a_channels_last_input():
    x = randn(np.random.default_rng(0), (2, 3, 4, 4))
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(Flatten().forward(channels_last), x.reshape(2, -1))


@pytest.mark.parametrize("build, shape, message", [
    (lambda: MaxPool2d(2), (2, 3, 4), r"MaxPool2d\(kernel_size=\(2, 2\).*expected a 4-D input, got shape \(2, 3, 4\)"),
    (lambda: AvgPool2d(5), (1, 1, 3, 3), r"AvgPool2d\(.*kernel 5x5 is larger than the padded input 3x3"),
    (lambda: MaxPool2d(2, padding=2), (1, 1, 6, 6), "padding should be at most half the kernel size"),
    (lambda: AdaptiveAvgPool2d(1), (3, 4), r"AdaptiveAvgPool2d\(output_size=\(1, 1\)\): expected a 4-D input"),
])
def test_pooling_refuses_bad_input(build, shape, message):
    with pytest.raises(ShapeError, match=message):
        build().forward(np.zeros(shape, np.float32))
