"""PReLU, the layer of docs/writing-a-layer.md: gradient check in float64, parity with torch.nn.PReLU in float32."""

from __future__ import annotations

import numpy
import pytest
import torch

import mnn
from mnn.layers import PReLU


def away_from_zero(rng, shape):
    x = rng.standard_normal(shape)
    return numpy.sign(x) * (0.1 + numpy.abs(x))  # no input within eps of the kink at 0


@pytest.mark.parametrize("num_parameters, shape", [(1, (4, 3, 5)), (3, (4, 3, 5)), (3, (2, 3, 4, 5)), (1, (6,))])
def test_gradcheck_float64(num_parameters, shape):
    rng = numpy.random.default_rng(0)
    layer = PReLU(num_parameters, dtype=numpy.float64)
    layer.params["weight"][...] = rng.uniform(0.05, 0.5, num_parameters)
    errors = mnn.gradcheck(layer, away_from_zero(rng, shape))
    assert set(errors) == {"input0", "weight"} and max(errors.values()) < 1e-7


@pytest.mark.parametrize("num_parameters, shape", [(1, (8, 5)), (5, (8, 5)), (4, (3, 4, 6, 7))])
def test_matches_torch_float32(num_parameters, shape):
    rng = numpy.random.default_rng(1)
    x = rng.standard_normal(shape).astype(numpy.float32)
    g = rng.standard_normal(shape).astype(numpy.float32)
    ours = PReLU(num_parameters, init=0.2, dtype=numpy.float32)
    theirs = torch.nn.PReLU(num_parameters, init=0.2)
    theirs.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})  # same names
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = theirs(xt)
    yt.backward(torch.from_numpy(g))
    y = ours.forward(x)
    dx = ours.backward(g)
    assert y.dtype == numpy.float32 and dx.dtype == numpy.float32
    numpy.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-6, atol=1e-6)
    numpy.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    numpy.testing.assert_allclose(ours.grads["weight"], theirs.weight.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_shapes_are_named_in_errors():
    layer = PReLU(3, dtype=numpy.float64)
    x = away_from_zero(numpy.random.default_rng(2), (4, 3))
    with pytest.raises(mnn.ShapeError, match=r"PReLU\(num_parameters=3\): expected input \(N, 3, \.\.\.\), got shape \(4, 5\)"):
        layer.forward(numpy.zeros((4, 5)))
    layer.forward(x)
    with pytest.raises(mnn.ShapeError, match=r"backward expected dy of the output's shape \(4, 3\), got \(3, 4\)"):
        layer.backward(numpy.zeros((3, 4)))
