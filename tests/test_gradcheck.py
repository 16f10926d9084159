"""mnn.gradcheck checks the whole backward contract, and a mis-shaped upstream gradient is named, not broadcast."""

import numpy as np
import pytest

import mnn
from mnn.backend import default_dtype
from mnn.errors import ShapeError
from mnn.layers import (GELU, Dropout, Embedding, LayerNorm, Linear, Log, LogSoftmax, MatrixProduct,
                        MultiHeadAttention, ReLU, Sigmoid, Softmax, Tanh)
from mnn.module import Module, Sequential

RNG = np.random.default_rng(99)


def normal(*shape, dtype=np.float64):
    return RNG.standard_normal(shape).astype(dtype)


class Scale(Module):
    """``y = x * w`` per feature; ``assign`` picks how backward stores the gradient of ``w``."""

    def __init__(self, features: int, assign: str = "accumulate") -> None:
        super().__init__()
        self.assign = assign
        self.add_parameter("w", normal(features))

    def forward(self, x):
        self.cache = x
        return x * self.params["w"]

    def backward(self, dy):
        x = self.pop_cache()
        dw = (dy * x).reshape(-1, x.shape[-1]).sum(axis=0)
        if self.assign == "accumulate":
            self.grads["w"] += dw
        elif self.assign == "overwrite":  # the bug: drops whatever was accumulated before
            self.grads["w"] = dw
        elif self.assign == "overwrite-in-place":
            self.grads["w"][...] = dw
        elif self.assign == "rebind":  # right values, but a new array the optimizer does not hold
            self.grads["w"] = self.grads["w"] + dw
        elif self.assign == "wrong-shape":
            self.grads["w"] = dw[:1].copy()  # (1,) for a (3,) parameter
        return dy * self.params["w"]


def test_a_correct_custom_layer_passes():
    errors = mnn.gradcheck(Scale(3), normal(4, 3))
    assert set(errors) == {"input0", "w"} and max(errors.values()) <= 1e-7


@pytest.mark.parametrize("assign", ["overwrite", "overwrite-in-place"])
def test_gradcheck_catches_a_backward_that_overwrites_its_gradient(assign):
    with pytest.raises(mnn.GradcheckError, match=r"Scale\(\).*\bw\b.*accumulat"):
        mnn.gradcheck(Scale(3, assign), normal(4, 3))


def test_the_overwritten_parameter_is_named_by_its_dotted_name():
    model = Sequential(Linear(3, 3, rng=np.random.default_rng(0), dtype=np.float64), Scale(3, "overwrite"))
    with pytest.raises(mnn.GradcheckError, match=r"1\.w\b") as caught:
        mnn.gradcheck(model, normal(4, 3))
    assert "0.weight" not in str(caught.value) and "0.bias" not in str(caught.value)


def test_without_raising_the_accumulation_failure_is_in_the_errors():
    errors = mnn.gradcheck(Scale(3, "overwrite"), normal(4, 3), raise_on_failure=False)
    assert errors["w (accumulation)"] > 0.1 and errors["w"] <= 1e-7


def test_gradcheck_catches_a_backward_that_replaces_the_gradient_array():
    with pytest.raises(mnn.GradcheckError, match=r"\bw\b.*(in place|new array)"):
        mnn.gradcheck(Scale(3, "rebind"), normal(4, 3))


def test_a_gradient_of_the_wrong_shape_names_the_layer_the_parameter_and_both_shapes():
    with pytest.raises(mnn.GradcheckError, match=r"Scale\(\).*\bw\b.*\(1,\).*\(3,\)|Scale\(\).*\bw\b.*\(3,\).*\(1,\)"):
        mnn.gradcheck(Scale(3, "wrong-shape"), normal(4, 3))


def test_a_backward_returning_the_wrong_shape_names_the_layer_and_both_shapes():
    class SummingTanh(Tanh):
        def backward(self, dy):
            y = self.pop_cache()
            return (dy * (1.0 - y * y)).sum(axis=0)  # (4,) where the input is (3, 4)

    with pytest.raises(mnn.GradcheckError, match=r"SummingTanh\(\).*input0.*\(4,\).*\(3, 4\)"):
        mnn.gradcheck(SummingTanh(), normal(3, 4))


def test_float32_parameters_are_refused_naming_the_dtype_and_the_way_to_float64():
    assert default_dtype() == np.float32
    with pytest.raises(ShapeError, match=r"needs float64.*Linear\(4, 3.*float32") as caught:
        mnn.gradcheck(Linear(4, 3, rng=np.random.default_rng(0)), normal(2, 4))
    message = str(caught.value)
    assert "dtype=numpy.float64" in message and "mnn.set_default_dtype(numpy.float64)" in message


def test_float32_inputs_are_refused_naming_the_input():
    with pytest.raises(ShapeError, match=r"needs float64.*input1 is float32"):
        mnn.gradcheck(MatrixProduct(), (normal(2, 3), normal(3, 2, dtype=np.float32)))


def test_float32_upstream_is_refused():
    with pytest.raises(ShapeError, match=r"needs float64.*upstream.*float32"):
        mnn.gradcheck(Tanh(), normal(2, 3), upstream=normal(2, 3, dtype=np.float32))


def test_float64_under_set_default_dtype_passes():
    previous = default_dtype()
    mnn.set_default_dtype(np.float64)
    try:
        errors = mnn.gradcheck(LayerNorm(4), normal(2, 4))
    finally:
        mnn.set_default_dtype(previous)
    assert max(errors.values()) <= 1e-7


# -- a mis-shaped upstream gradient reaching backward --------------------------
def _attention():
    return MultiHeadAttention(4, 2, rng=np.random.default_rng(0), dtype=np.float64)


# name -> (layer, forward inputs, the output's shape)
BACKWARD_CASES = {
    "Linear": (lambda: Linear(4, 10, dtype=np.float64), lambda: (normal(7, 4),), (7, 10)),
    "ReLU": (ReLU, lambda: (normal(3, 5),), (3, 5)),
    "Sigmoid": (Sigmoid, lambda: (normal(3, 5),), (3, 5)),
    "Tanh": (Tanh, lambda: (normal(3, 5),), (3, 5)),
    "Log": (Log, lambda: (np.abs(normal(3, 5)) + 0.5,), (3, 5)),
    "GELU": (GELU, lambda: (normal(3, 5),), (3, 5)),
    "Softmax": (Softmax, lambda: (normal(3, 5),), (3, 5)),
    "LogSoftmax": (LogSoftmax, lambda: (normal(3, 5),), (3, 5)),
    "Dropout": (lambda: Dropout(0.5, rng=np.random.default_rng(0)), lambda: (normal(3, 5),), (3, 5)),
    "MatrixProduct": (MatrixProduct, lambda: (normal(2, 3, 4), normal(2, 4, 5)), (2, 3, 5)),
    "Embedding": (lambda: Embedding(7, 4, dtype=np.float64), lambda: (np.array([[1, 2, 3], [4, 5, 6]]),), (2, 3, 4)),
    "LayerNorm": (lambda: LayerNorm(5, dtype=np.float64), lambda: (normal(3, 5),), (3, 5)),
    "MultiHeadAttention": (_attention, lambda: (normal(2, 3, 4),), (2, 3, 4)),
}


@pytest.mark.parametrize("name", BACKWARD_CASES)
@pytest.mark.parametrize("wrong", ["transposed", "flat", "one row short"])
def test_backward_refuses_a_mis_shaped_dy_naming_the_layer_and_both_shapes(name, wrong, compute_path):
    make, inputs, shape = BACKWARD_CASES[name]
    layer = make()
    assert layer.forward(*inputs()).shape == shape
    dy = {"transposed": lambda: normal(*shape[::-1]), "flat": lambda: normal(int(np.prod(shape))),
          "one row short": lambda: normal(shape[0] - 1, *shape[1:])}[wrong]()
    if dy.shape == shape:  # a square output: its transpose has the right shape
        pytest.skip("the transposed shape is the same")
    with pytest.raises(ShapeError) as caught:
        layer.backward(dy)
    message = str(caught.value)
    assert message.startswith(repr(layer)), message
    assert str(shape) in message and str(dy.shape) in message, message


def test_linear_backward_message_reads_as_forward_does():
    layer = Linear(4, 10, dtype=np.float64)
    layer.forward(normal(7, 4))
    with pytest.raises(ShapeError, match=r"^Linear\(4, 10, bias=True\): backward expected dy of the output's shape "
                                         r"\(7, 10\), got \(7, 4\)$"):
        layer.backward(normal(7, 4))
