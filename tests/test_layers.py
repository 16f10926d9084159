"""Every core layer and loss, proved two ways: float64 finite differences and PyTorch autograd."""

import numpy as np
import pytest
import torch

import mnn
from mnn import jit
from mnn.backend import asarray, read_scalar, to_numpy
from mnn.errors import InputError, ShapeError
from mnn.layers import (
    ELU,
    Dropout,
    LeakyReLU,
    Linear,
    Log,
    LogSoftmax,
    MatrixProduct,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
)
from mnn.losses import CrossEntropyLoss, MSELoss, NLLLoss
from mnn.module import Sequential

BATCH_SHAPES = [(5,), (2, 3), (2, 1, 3)]
RNG = np.random.default_rng(1234)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def normal(shape, dtype=np.float64):
    return RNG.standard_normal(shape).astype(dtype)


def positive(shape, dtype=np.float64):
    return RNG.uniform(0.5, 2.0, shape).astype(dtype)


ELEMENTWISE = {
    "ReLU": (ReLU, torch.relu, normal),
    "Sigmoid": (Sigmoid, torch.sigmoid, normal),
    "Tanh": (Tanh, torch.tanh, normal),
    "Log": (Log, torch.log, positive),
    "Softmax": (Softmax, lambda t: torch.softmax(t, dim=-1), normal),
    "LogSoftmax": (LogSoftmax, lambda t: torch.log_softmax(t, dim=-1), normal),
    "LeakyReLU": (lambda: LeakyReLU(0.2), lambda t: torch.nn.functional.leaky_relu(t, 0.2), normal),
    "SiLU": (SiLU, torch.nn.functional.silu, normal),
    "ELU": (lambda: ELU(0.7), lambda t: torch.nn.functional.elu(t, 0.7), normal),
}


# -- finite differences, float64 ---------------------------------------------
@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_elementwise_gradcheck(name, batch, compute_path):
    make, _, sample = ELEMENTWISE[name]
    x = sample(batch + (4,))
    if name in ("ReLU", "LeakyReLU", "ELU"):  # keep clear of the kink at 0, where the derivative jumps
        x[np.abs(x) < 1e-3] = 0.5
    errors = mnn.gradcheck(make(), x)
    assert max(errors.values()) <= 1e-7


@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_linear_gradcheck(batch):
    layer = Linear(4, 3, rng=np.random.default_rng(0), dtype=np.float64)
    errors = mnn.gradcheck(layer, normal(batch + (4,)))
    assert set(errors) == {"input0", "weight", "bias"}
    assert max(errors.values()) <= 1e-7


@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_matrix_product_gradcheck(batch):
    q, p = normal(batch + (3, 4)), normal(batch + (4, 2))
    errors = mnn.gradcheck(MatrixProduct(), (q, p))
    assert set(errors) == {"input0", "input1"}
    assert max(errors.values()) <= 1e-7


def test_dropout_gradcheck_with_fixed_mask():
    layer = Dropout(0.3)
    errors = mnn.gradcheck(layer, normal((6, 5)), before_forward=lambda: setattr(layer, "rng", np.random.default_rng(7)))
    assert max(errors.values()) <= 1e-7


@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_loss_gradchecks(batch, compute_path):
    logits = normal(batch + (5,))
    labels = RNG.integers(0, 5, batch)
    for loss, inputs in [
        (CrossEntropyLoss(), (logits, labels)),
        (NLLLoss(), (logits, labels)),
        (MSELoss(), (logits, normal(logits.shape))),
    ]:
        errors = mnn.gradcheck(loss, inputs)
        assert max(errors.values()) <= 1e-7, (loss, errors)


def test_gradcheck_catches_a_wrong_backward():
    class WrongTanh(Tanh):
        def backward(self, dy):
            y = self.pop_cache()
            return dy * (1.0 - y)  # missing the square

    with pytest.raises(mnn.GradcheckError, match="input0"):
        mnn.gradcheck(WrongTanh(), normal((3, 4)))


# -- parity with PyTorch, float32 ---------------------------------------------
def torch_grad(fn, *arrays, upstream):
    tensors = [torch.tensor(a, requires_grad=np.issubdtype(a.dtype, np.floating)) for a in arrays]
    out = fn(*tensors)
    out.backward(torch.tensor(upstream))
    return out.detach().numpy(), [t.grad.numpy() if t.grad is not None else None for t in tensors]


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_matches_torch(name, compute_path):
    make, torch_fn, sample = ELEMENTWISE[name]
    x = sample((3, 2, 7), np.float32)
    dy = normal(x.shape, np.float32)
    layer = make()
    y = layer.forward(x)
    dx = layer.backward(dy)
    ty, (tdx,) = torch_grad(torch_fn, x, upstream=dy)
    assert y.dtype == np.float32 and dx.dtype == np.float32
    assert relative_error(y, ty) <= 1e-5
    assert relative_error(dx, tdx) <= 1e-5


def test_linear_matches_torch():
    layer = Linear(6, 4, rng=np.random.default_rng(3))
    x, dy = normal((2, 5, 6), np.float32), normal((2, 5, 4), np.float32)
    y = layer.forward(x)
    dx = layer.backward(dy)
    ref = torch.nn.Linear(6, 4)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(to_numpy(layer.params["weight"])))
        ref.bias.copy_(torch.from_numpy(to_numpy(layer.params["bias"])))
    ty, (tdx,) = torch_grad(ref, x, upstream=dy)
    assert relative_error(y, ty) <= 1e-5
    assert relative_error(dx, tdx) <= 1e-5
    assert relative_error(layer.grads["weight"], ref.weight.grad) <= 1e-5
    assert relative_error(layer.grads["bias"], ref.bias.grad) <= 1e-5


@pytest.mark.parametrize("sgemm", [True, False], ids=["sgemm-beta-1", "numpy"])
def test_linear_weight_gradient_accumulates_on_both_paths(sgemm, monkeypatch):
    """``grad += dy.T @ x`` as one sgemm call (mnn.blas) or numpy's expression: the same sums, accumulated."""
    from mnn import blas
    from mnn.backend import xp

    if sgemm and (blas.sgemm_address() is None or xp._module is not np):
        pytest.skip("numpy's BLAS exports no ILP64 sgemm here, or the arrays are not numpy's")
    if not sgemm:
        monkeypatch.setattr(blas, "sgemm_address", lambda: None)
    layer = Linear(160, 128, rng=np.random.default_rng(3))  # 20480 weights: over blas.MIN_SIZE
    x, dy = normal((3, 4, 160), np.float32), normal((3, 4, 128), np.float32)
    assert blas.can_accumulate(layer.grads["weight"], dy.reshape(-1, 128), x.reshape(-1, 160)) == sgemm
    assert not blas.can_accumulate(np.zeros((5, 7), np.float32), dy[..., :5].reshape(-1, 5).copy(),
                                   x[..., :7].reshape(-1, 7).copy())  # small: numpy's expression
    expected = dy.reshape(-1, 128).astype(np.float64).T @ x.reshape(-1, 160).astype(np.float64)
    for times in (1, 2):  # the second backward adds to the first
        layer.forward(x)
        layer.backward(dy)
        assert relative_error(layer.grads["weight"], times * expected) <= 1e-6, times


def test_matrix_product_matches_torch():
    q, p, dd = normal((2, 3, 4, 5), np.float32), normal((2, 3, 5, 6), np.float32), normal((2, 3, 4, 6), np.float32)
    layer = MatrixProduct()
    d = layer.forward(q, p)
    dq, dp = layer.backward(dd)
    td, (tdq, tdp) = torch_grad(torch.matmul, q, p, upstream=dd)
    for ours, theirs in [(d, td), (dq, tdq), (dp, tdp)]:
        assert relative_error(ours, theirs) <= 1e-5


def test_dropout_matches_torch_semantics():
    x = np.ones((2000, 50), np.float32)
    layer = Dropout(0.25, rng=np.random.default_rng(0))
    y = layer.forward(x)
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)  # torch scales kept units by 1/(1-p)
    dx = layer.backward(np.full_like(x, 2.0))
    np.testing.assert_array_equal(dx != 0, kept)
    layer.eval()
    x = asarray(x)  # on the device, as the layer would get it: returned as is
    assert layer.forward(x) is x


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "NLLLoss", "MSELoss"])
def test_losses_match_torch(name, compute_path):
    logits = normal((3, 4, 10), np.float32)
    labels = RNG.integers(0, 10, (3, 4))
    target = normal(logits.shape, np.float32)
    ours = {"CrossEntropyLoss": CrossEntropyLoss(), "NLLLoss": NLLLoss(), "MSELoss": MSELoss()}[name]
    second = target if name == "MSELoss" else labels
    loss = ours.forward(logits, second)
    grad = ours.backward(1.0)

    t_logits = torch.tensor(logits, requires_grad=True)
    if name == "MSELoss":
        t_loss = torch.nn.functional.mse_loss(t_logits, torch.tensor(target))
    else:
        flat = t_logits.reshape(-1, 10)
        fn = torch.nn.functional.cross_entropy if name == "CrossEntropyLoss" else torch.nn.functional.nll_loss
        t_loss = fn(flat, torch.tensor(labels.reshape(-1)))
    t_loss.backward()
    assert relative_error(loss, t_loss.item()) <= 1e-5
    assert relative_error(grad, t_logits.grad.numpy()) <= 1e-5


def test_cross_entropy_paths_agree_on_large_logits_and_scaled_upstream():
    """The compiled loops and numpy give the same loss and gradient, with logits far from 0 and dloss != 1."""
    logits = normal((64, 10), np.float32) * 30 + 1e4  # exp(1e4) overflows: only the shift keeps it finite
    labels = RNG.integers(0, 10, 64)
    results = {}
    for path in (False, True):
        previous = jit.set_enabled(path)
        try:
            loss_fn = CrossEntropyLoss()
            loss = loss_fn.forward(logits, labels)
            results[path] = (loss, loss_fn.backward(0.5))
        finally:
            jit.set_enabled(previous)
    (loss_np, grad_np), (loss_jit, grad_jit) = results[False], results[True]
    assert np.isfinite(loss_jit) and loss_jit.dtype == np.float32 and grad_jit.dtype == np.float32
    assert abs(float(loss_jit) - float(loss_np)) <= 1e-5 * abs(float(loss_np))
    assert np.abs(grad_jit - grad_np).max() <= 1e-7


def test_relu_paths_agree_on_nan_and_signed_zero():
    x = np.array([[-1.5, -0.0, 0.0, 2.0, np.nan]], np.float32)
    outputs = []
    for path in (False, True):
        previous = jit.set_enabled(path)
        try:
            layer = ReLU()
            outputs.append((layer.forward(x), layer.backward(np.ones_like(x))))
        finally:
            jit.set_enabled(previous)
    for (y_np, dx_np), (y_jit, dx_jit) in [outputs]:
        np.testing.assert_array_equal(y_jit, y_np)  # NaN stays NaN, as in torch.relu
        assert np.array_equal(np.signbit(y_jit), np.signbit(y_np))
        np.testing.assert_array_equal(dx_jit, dx_np)
    assert np.isnan(outputs[1][0][0, 4]) and outputs[1][1][0, 3] == 1.0 and outputs[1][1][0, 0] == 0.0


def test_relu_on_a_transposed_input_takes_any_gradient_layout(compute_path):
    """A non-contiguous input (numpy path) then a contiguous gradient: the two arrays differ in layout."""
    x = normal((6, 4), np.float32).T  # F-ordered view
    layer = ReLU()
    y = layer.forward(x)
    dy = normal(y.shape, np.float32)
    np.testing.assert_array_equal(layer.backward(dy), dy * (x > 0))


def test_relu_keeps_a_channels_last_layout_and_takes_either_gradient_layout(compute_path):
    """Conv2d's channels-last output: the compiled loop runs over it in memory order, the output keeps it."""
    x = normal((2, 3, 4, 5), np.float32)
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    layer = ReLU()
    y = layer.forward(channels_last)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous
    dy = normal(y.shape, np.float32)
    for upstream in (dy, np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)):
        layer.forward(channels_last)
        np.testing.assert_array_equal(layer.backward(upstream), dy * (x > 0))


def test_sequential_mlp_matches_torch_end_to_end():
    rng = np.random.default_rng(5)
    model = Sequential(Linear(8, 16, rng=rng), ReLU(), Linear(16, 3, rng=rng))
    x, labels = normal((10, 8), np.float32), RNG.integers(0, 3, 10)
    loss_fn = CrossEntropyLoss()
    loss = loss_fn.forward(model.forward(x), labels)
    model.backward(loss_fn.backward())

    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    ref.load_state_dict({k: torch.from_numpy(to_numpy(v).copy()) for k, v in model.state_dict().items()})
    t_loss = torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(labels))
    t_loss.backward()
    assert relative_error(loss, t_loss.item()) <= 1e-5
    torch_grads = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    for name, grad in model.named_grads():
        assert relative_error(grad, torch_grads[name]) <= 1e-5, name


# -- the contract --------------------------------------------------------------
def test_gradients_accumulate_until_zeroed():
    layer = Linear(3, 2, rng=np.random.default_rng(0), dtype=np.float64)
    x, dy = normal((4, 3)), normal((4, 2))
    layer.forward(x)
    layer.backward(dy)
    once = layer.grads["weight"].copy()
    layer.forward(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.grads["weight"], 2 * once)
    layer.zero_grad()
    assert not layer.grads["weight"].any()


def test_backward_without_forward_is_an_error():
    with pytest.raises(RuntimeError, match="without a forward"):
        ReLU().backward(np.ones(3))


def test_bad_inputs_are_named():
    with pytest.raises(ShapeError, match=r"Linear\(784, 256.*\(64, 100\)"):
        Linear(784, 256).forward(np.zeros((64, 100), np.float32))
    with pytest.raises(ShapeError, match="cannot multiply"):
        MatrixProduct().forward(np.zeros((2, 3)), np.zeros((4, 2)))
    # On a device a range check waits for the loss's read-back (read_scalar); on the CPU it raises at once.
    with pytest.raises(InputError, match="target class 10 out of range"):
        read_scalar(CrossEntropyLoss().forward(np.zeros((2, 10)), np.array([3, 10])))
    with pytest.raises(InputError, match="target class -1"):
        read_scalar(NLLLoss().forward(np.zeros((2, 10)), np.array([-1, 0])))
    with pytest.raises(ShapeError, match="integer class ids"):
        CrossEntropyLoss().forward(np.zeros((2, 10)), np.array([1.0, 2.0]))
    with pytest.raises(ShapeError, match="do not match"):
        CrossEntropyLoss().forward(np.zeros((2, 10)), np.array([1, 2, 3]))
    with pytest.raises(InputError, match="positive"):
        Log().forward(np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="p must be"):
        Dropout(1.0)


def test_state_dict_is_strict_and_all_or_nothing():
    rng = np.random.default_rng(0)
    model = Sequential(Linear(4, 3, rng=rng), ReLU(), Linear(3, 2, rng=rng))
    state = {k: v.copy() + 1 for k, v in model.state_dict().items()}
    before = {k: v.copy() for k, v in model.state_dict().items()}
    broken = dict(state)
    del broken["2.bias"]
    broken["9.weight"] = np.zeros(1)
    broken["0.weight"] = np.zeros((3, 5))
    with pytest.raises(mnn.CheckpointError) as info:
        model.load_state_dict(broken)
    message = str(info.value)
    assert "missing 2.bias" in message and "unexpected 9.weight" in message and "0.weight: expected (3, 4), got (3, 5)" in message
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])  # nothing was partly loaded
    model.load_state_dict(state)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]


# -- Softmax: the additive mask and the caller's shift (attention's own-key score) ------
CAUSAL = np.triu(np.full((4, 4), -np.inf), k=1)


def own_scores(x):
    return np.diagonal(x, axis1=-2, axis2=-1)[..., None].copy()


class CausalSoftmax(Softmax):
    def forward(self, x):
        return super().forward(x, CAUSAL, own_scores(x))


def test_softmax_with_mask_and_shift_gradcheck_and_matches_torch(compute_path):
    x = normal((2, 3, 4, 4))
    errors = mnn.gradcheck(CausalSoftmax(), x)
    assert max(errors.values()) <= 1e-7
    layer, before = Softmax(axis=-1), x.copy()
    y = layer.forward(x, CAUSAL, own_scores(x))
    g = normal(y.shape)
    dx = layer.backward(g)
    t = torch.tensor(x, requires_grad=True)
    torch.softmax(t + torch.tensor(CAUSAL), dim=-1).backward(torch.tensor(g))
    expected = torch.softmax(torch.tensor(x) + torch.tensor(CAUSAL), dim=-1).numpy()
    assert relative_error(y, expected) <= 1e-14
    assert relative_error(dx, t.grad.numpy()) <= 1e-14
    assert np.all(y[..., CAUSAL == -np.inf] == 0.0)  # no query sees a later key
    assert np.array_equal(x, before)  # the input is left as it was


def test_softmax_shift_that_would_overflow_falls_back_to_the_row_maximum(compute_path):
    # The shift (each row's first entry) sits 200 below the row's largest entry: e^200 overflows
    # float32 and float64 alike, so the layer must start again with the row maximum.
    for dtype in (np.float32, np.float64):
        x = normal((3, 5)).astype(dtype)
        x[:, 3] += 200.0
        y = Softmax().forward(x, shift=x[:, :1].copy())
        expected = torch.softmax(torch.tensor(x, dtype=torch.float64), dim=-1).numpy()
        assert np.all(np.isfinite(y)) and y.dtype == dtype
        assert relative_error(y, expected) <= (1e-6 if dtype == np.float32 else 1e-14)


def test_softmax_shift_gives_the_same_result_as_the_row_maximum(compute_path):
    x = normal((6, 5)) * 10.0
    shifted = Softmax().forward(x, shift=x[:, 2:3].copy())  # any entry of the row is a valid shift
    assert relative_error(shifted, Softmax().forward(x)) <= 1e-14


def test_softmax_nan_and_fully_masked_rows_are_nan_as_in_torch(compute_path):
    x = normal((3, 4))
    x[1, 2] = np.nan
    mask = np.zeros((3, 4))
    mask[2] = -np.inf  # a row with every position dropped
    with np.errstate(invalid="ignore"):  # NaN - NaN and -inf - (-inf), as in torch
        y = Softmax().forward(x, mask, x[:, :1].copy())
    expected = torch.softmax(torch.tensor(x) + torch.tensor(mask), dim=-1).numpy()
    assert np.all(np.isnan(y[1:])) and np.all(np.isnan(expected[1:]))
    assert relative_error(y[0], expected[0]) <= 1e-14


@pytest.mark.parametrize("offset", [0.0, 200.0])  # 200: the overflow check sends it to the row maximum
def test_softmax_in_place_gives_the_same_result(offset, compute_path):
    x = normal((2, 4, 4))
    x[..., 1] += offset
    expected = Softmax().forward(x, CAUSAL, own_scores(x))
    buffer = asarray(x.copy())  # on the device: the output is written into it
    y = Softmax().forward(buffer, CAUSAL, own_scores(buffer), out=buffer)
    assert y is buffer and np.array_equal(y, expected) and np.all(np.isfinite(y))
