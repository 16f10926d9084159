"""Conv2d: float64 finite differences, PyTorch parity over a grid of configurations, state dicts, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_transformer import DTYPES, perturb_params, randn, rel
from torch.nn import functional as F

import mnn
from mnn.backend import to_numpy
from mnn.errors import ShapeError
from mnn.layers import Conv2d
from mnn.module import Sequential

# (in, out, kernel, stride, padding, dilation, groups, input H x W)
GRID = [
    (3, 4, 3, 1, 1, 1, 1, (7, 6)),
    (3, 5, 1, 1, 0, 1, 1, (5, 5)),
    (2, 4, (3, 2), (2, 1), (1, 0), 1, 2, (8, 7)),
    (4, 6, 3, 2, 2, 2, 2, (9, 9)),
    (6, 6, 3, 1, 1, 1, 6, (6, 5)),  # depthwise
    (4, 8, (2, 3), (1, 2), (0, 1), (2, 1), 4, (7, 8)),  # depthwise with a channel multiplier
    (3, 2, 5, 3, 2, 1, 1, (10, 11)),
]


def make(config, dtype, bias=True, seed=0):
    cin, cout, k, s, p, d, g, _ = config
    return Conv2d(cin, cout, k, s, p, d, g, bias=bias, rng=np.random.default_rng(seed), dtype=dtype)


@pytest.mark.parametrize("config", GRID[:5])
def test_conv2d_gradcheck(config, compute_path):
    layer = make(config, np.float64, bias=config[6] == 1 or config[0] != config[1])
    x = randn(np.random.default_rng(1), (2, config[0], *config[7]))
    errors = mnn.gradcheck(layer, x)
    assert set(errors) == {"input0", *(name for name, _ in layer.named_parameters())}
    assert max(errors.values()) <= 1e-7, errors


@pytest.mark.parametrize("config", [GRID[0], GRID[3]])
def test_conv2d_gradcheck_on_channels_last_memory(config, compute_path):
    """Behind another Conv2d: the input (channels-last) is read in place, the input gradient is channels-last."""
    model = Sequential(Conv2d(config[0], config[0], 1, rng=np.random.default_rng(5), dtype=np.float64),
                       make(config, np.float64))
    errors = mnn.gradcheck(model, randn(np.random.default_rng(1), (2, config[0], *config[7])))
    assert max(errors.values()) <= 1e-7, errors


@pytest.mark.parametrize("np_dtype, torch_dtype, tol", DTYPES)
@pytest.mark.parametrize("config", GRID)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv2d_matches_pytorch(config, np_dtype, torch_dtype, tol, layout, compute_path):
    rng = np.random.default_rng(2)
    layer = make(config, np_dtype)
    x = randn(rng, (3, config[0], *config[7]), np_dtype)
    if layout == "channels_last":  # as a previous Conv2d returns it
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y = layer.forward(x)
    dy = randn(rng, y.shape, np_dtype)
    if layout == "channels_last":
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dx = layer.backward(dy)
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous and dx.strides[1] == dx.itemsize  # channels-last memory
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(to_numpy(layer.params["weight"]), requires_grad=True)
    bt = torch.tensor(to_numpy(layer.params["bias"]), requires_grad=True)
    _, _, _, s, p, d, g, _ = config
    yt = F.conv2d(xt, wt, bt, s, p, d, g)
    yt.backward(torch.from_numpy(dy))
    assert y.dtype == np_dtype and dx.dtype == np_dtype and y.shape == tuple(yt.shape)
    for ours, theirs in [(y, yt), (dx, xt.grad), (layer.grads["weight"], wt.grad), (layer.grads["bias"], bt.grad)]:
        assert rel(ours, theirs) <= tol


def test_conv2d_accepts_any_memory_layout_and_skips_the_input_gradient_on_request():
    rng = np.random.default_rng(3)
    layer = Conv2d(3, 4, 3, padding=1, rng=np.random.default_rng(0), dtype=np.float64, input_grad=False)
    x = randn(rng, (2, 3, 5, 5))
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y = layer.forward(channels_last)
    np.testing.assert_allclose(y, F.conv2d(torch.from_numpy(x), torch.from_numpy(to_numpy(layer.params["weight"])),
                                           torch.from_numpy(to_numpy(layer.params["bias"])), padding=1).numpy(), rtol=1e-12)
    assert layer.backward(np.ascontiguousarray(randn(rng, y.shape))) is None
    assert np.abs(layer.grads["weight"]).sum() > 0


def test_conv2d_init_and_state_dict_move_both_ways_with_torch():
    layer = Conv2d(4, 6, (3, 2), stride=2, padding=1, groups=2, rng=np.random.default_rng(0))
    bound = 1 / np.sqrt(2 * 3 * 2)
    assert layer.params["weight"].shape == (6, 2, 3, 2) and layer.params["weight"].dtype == np.float32
    assert np.abs(layer.params["weight"]).max() <= bound and np.abs(layer.params["bias"]).max() <= bound
    ref = torch.nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, groups=2)
    ref.load_state_dict({k: torch.from_numpy(to_numpy(v)) for k, v in layer.state_dict().items()}, strict=True)
    x = randn(np.random.default_rng(1), (2, 4, 7, 6), np.float32)
    assert rel(layer.forward(x), ref(torch.from_numpy(x))) <= 1e-6
    perturb_params(layer, np.random.default_rng(2))
    layer.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    assert rel(layer.forward(x), ref(torch.from_numpy(x))) <= 1e-6


@pytest.mark.parametrize("build, x_shape, message", [
    (lambda: Conv2d(3, 4, 3), (2, 3, 5), "expected a 4-D input"),
    (lambda: Conv2d(3, 4, 3), (2, 2, 5, 5), r"expected input \(N, 3, H, W\), got shape \(2, 2, 5, 5\)"),
    (lambda: Conv2d(3, 4, 5, padding=1), (1, 3, 2, 2), "larger than the padded input 4x4"),
    (lambda: Conv2d(3, 4, 3, dilation=3), (1, 3, 6, 6), "kernel \\(dilated 7x7\\) is larger"),
])
def test_conv2d_refuses_bad_input_naming_layer_and_shapes(build, x_shape, message):
    with pytest.raises(ShapeError, match=r"Conv2d\(3, 4, .*" + message):
        build().forward(np.zeros(x_shape, np.float32))


def test_conv2d_refuses_bad_configuration_and_upstream_gradient():
    with pytest.raises(ValueError, match=r"in_channels \(3\) .* divisible by groups \(2\)"):
        Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        Conv2d(3, 4, (3, 3, 3))
    layer = Conv2d(3, 4, 3)
    layer.forward(np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(ShapeError, match=r"backward expected dy of the output's shape \(2, 4, 3, 3\)"):
        layer.backward(np.zeros((2, 4, 5, 5), np.float32))


def test_conv2d_two_forwards_before_backward_keep_their_own_columns():
    layer = Conv2d(2, 3, 3, rng=np.random.default_rng(0), dtype=np.float64)
    rng = np.random.default_rng(4)
    x1, x2 = randn(rng, (1, 2, 5, 5)), randn(rng, (1, 2, 5, 5))
    dy = randn(rng, (1, 3, 3, 3))
    layer.forward(x1)
    layer.backward(dy)  # leaves a spare column buffer
    expected = layer.grads["weight"].copy()
    layer.zero_grad()
    with mnn.no_grad():
        layer.forward(x2)  # under no_grad: columns go back to the spare
    layer.forward(x1)
    layer.backward(dy)
    np.testing.assert_allclose(layer.grads["weight"], expected, rtol=1e-14)
