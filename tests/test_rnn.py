"""RNN, LSTM and GRU: float64 finite differences through time, and parity with torch.nn, gradient by gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_transformer import rel

import mnn
from mnn.backend import xp
from mnn.errors import ShapeError
from mnn.layers import GRU, LSTM, RNN
from mnn.module import Module

CELLS = {
    "rnn-tanh": (lambda *a, **k: RNN(*a, **k), lambda *a, **k: torch.nn.RNN(*a, **k)),
    "rnn-relu": (lambda *a, **k: RNN(*a, nonlinearity="relu", **k),
                 lambda *a, **k: torch.nn.RNN(*a, nonlinearity="relu", **k)),
    "lstm": (LSTM, torch.nn.LSTM),
    "gru": (GRU, torch.nn.GRU),
}
DTYPES = [(np.float32, torch.float32, 1e-5), (np.float64, torch.float64, 1e-9)]


def as_list(state):
    return list(state) if isinstance(state, tuple) else [state]


def pack(layer, arrays):
    """A list of state arrays in the layer's form: ``h`` or ``(h, c)``."""
    return tuple(arrays) if layer.STATES > 1 else arrays[0]


class Sequence(Module):
    """``(x[, h0[, c0]]) -> concat(output, h_n[, c_n])`` flattened: one array, so gradcheck sees every output.

    A random upstream gradient of this vector enters the layer through its
    output and through its final state at once.
    """

    def __init__(self, rnn, with_state: bool) -> None:
        super().__init__()
        self.rnn, self.with_state = rnn, with_state

    def forward(self, x, *state):
        output, final = self.rnn.forward(x, pack(self.rnn, list(state)) if self.with_state else None)
        self.cache = [output.shape] + [s.shape for s in as_list(final)]
        return xp.concatenate([a.ravel() for a in [output, *as_list(final)]])

    def backward(self, dy):
        shapes, parts, start = self.pop_cache(), [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            parts.append(dy[start:start + size].reshape(shape))
            start += size
        dx, dstate0 = self.rnn.backward(parts[0], pack(self.rnn, parts[1:]))
        return (dx, *as_list(dstate0)) if self.with_state else dx


# -- finite differences, float64 ---------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("with_state", [True, False])
def test_gradcheck_through_time(cell, num_layers, with_state, compute_path):
    rng = np.random.default_rng(3)
    rnn = CELLS[cell][0](3, 4, num_layers, rng=rng, dtype=np.float64)
    x = rng.standard_normal((5, 2, 3))
    states = [rng.standard_normal((num_layers, 2, 4)) for _ in range(rnn.STATES)] if with_state else []
    errors = mnn.gradcheck(Sequence(rnn, with_state), (x, *states), seed=1)
    expected = {f"input{i}" for i in range(1 + len(states))}
    expected |= {f"rnn.{name}" for name, _ in rnn.named_parameters()}
    assert set(errors) == expected
    assert max(errors.values()) <= 1e-7, errors


@pytest.mark.parametrize("cell", ["rnn-tanh", "lstm", "gru"])
def test_gradcheck_bidirectional_batch_first_without_bias(cell):
    rng = np.random.default_rng(4)
    rnn = CELLS[cell][0](3, 2, 2, bias=False, batch_first=True, bidirectional=True, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 4, 3))
    states = [rng.standard_normal((4, 2, 2)) for _ in range(rnn.STATES)]
    errors = mnn.gradcheck(Sequence(rnn, True), (x, *states), seed=2)
    assert len(errors) == 1 + len(states) + 2 * 2 * 2
    assert max(errors.values()) <= 1e-7, errors


def test_gradcheck_with_dropout_between_layers():
    rng = np.random.default_rng(5)
    rnn = LSTM(3, 4, 3, dropout=0.4, rng=rng, dtype=np.float64)

    def same_mask():
        rnn.rng = np.random.default_rng(11)

    errors = mnn.gradcheck(Sequence(rnn, False), rng.standard_normal((4, 2, 3)), before_forward=same_mask)
    assert max(errors.values()) <= 1e-7, errors


# -- parity with PyTorch ----------------------------------------------------------------------
def torch_twin(rnn, make_torch, torch_dtype, **options):
    twin = make_torch(rnn.input_size, rnn.hidden_size, rnn.num_layers, dtype=torch_dtype, **options)
    twin.load_state_dict({k: torch.tensor(np.array(v)) for k, v in rnn.state_dict().items()}, strict=True)
    return twin


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("np_dtype, torch_dtype, tol", DTYPES)
@pytest.mark.parametrize("batch_first, bidirectional", [(False, False), (True, False), (False, True)])
def test_matches_pytorch(cell, np_dtype, torch_dtype, tol, batch_first, bidirectional, compute_path):
    rng = np.random.default_rng(6)
    make, make_torch = CELLS[cell]
    options = {"batch_first": batch_first, "bidirectional": bidirectional}
    rnn = make(5, 6, 2, rng=rng, dtype=np_dtype, **options)
    twin = torch_twin(rnn, make_torch, torch_dtype, **options)
    T, B, D = 7, 3, 2 if bidirectional else 1
    x = rng.standard_normal((B, T, 5) if batch_first else (T, B, 5)).astype(np_dtype)
    state0 = [rng.standard_normal((2 * D, B, 6)).astype(np_dtype) for _ in range(rnn.STATES)]
    output, final = rnn.forward(x, pack(rnn, state0))
    doutput = rng.standard_normal(output.shape).astype(np_dtype)
    dfinal = [rng.standard_normal(s.shape).astype(np_dtype) for s in state0]
    for _, grad in rnn.named_grads():
        grad[...] = 1.0  # gradients accumulate
    dx, dstate0 = rnn.backward(doutput, pack(rnn, dfinal))

    tx = torch.tensor(x, requires_grad=True)
    tstate0 = [torch.tensor(s, requires_grad=True) for s in state0]
    toutput, tfinal = twin(tx, pack(rnn, tstate0))
    loss = (toutput * torch.tensor(doutput)).sum()
    loss = loss + sum((s * torch.tensor(g)).sum() for s, g in zip(as_list(tfinal), dfinal))
    loss.backward()

    assert output.dtype == dx.dtype == np_dtype and output.shape == tuple(toutput.shape)
    assert rel(output, toutput) <= tol
    for mine, theirs in zip(as_list(final), as_list(tfinal)):
        assert rel(mine, theirs) <= tol
    assert rel(dx, tx.grad) <= tol
    for mine, theirs in zip(as_list(dstate0), tstate0):
        assert mine.shape == tuple(theirs.shape) and rel(mine, theirs.grad) <= tol
    for name, param in twin.named_parameters():
        assert rel(rnn.grads[name] - 1.0, param.grad) <= tol, name
    assert rnn.cache is None  # released


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn-tanh"])
def test_no_initial_state_and_no_final_state_gradient_match_pytorch(cell):
    rng = np.random.default_rng(7)
    make, make_torch = CELLS[cell]
    rnn = make(4, 5, 2, rng=rng, dtype=np.float64)
    twin = torch_twin(rnn, make_torch, torch.float64)
    x = rng.standard_normal((6, 2, 4))
    output, final = rnn.forward(x)
    doutput = rng.standard_normal(output.shape)
    dc = rng.standard_normal((2, 2, 5))
    dstate = (None, dc) if rnn.STATES == 2 else None  # LSTM: a gradient through c_n alone
    dx, dstate0 = rnn.backward(doutput, dstate)
    tx = torch.tensor(x, requires_grad=True)
    toutput, tfinal = twin(tx)
    loss = (toutput * torch.tensor(doutput)).sum()
    if rnn.STATES == 2:
        loss = loss + (tfinal[1] * torch.tensor(dc)).sum()
    loss.backward()
    assert rel(output, toutput) <= 1e-9 and rel(dx, tx.grad) <= 1e-9
    for mine, theirs in zip(as_list(final), as_list(tfinal)):
        assert rel(mine, theirs) <= 1e-9
    assert all(s.shape == (2, 2, 5) for s in as_list(dstate0))  # the gradient of the zero initial state
    for name, param in twin.named_parameters():
        assert rel(rnn.grads[name], param.grad) <= 1e-9, name


@pytest.mark.parametrize("cell", CELLS)
def test_state_dict_moves_both_ways(cell):
    make, make_torch = CELLS[cell]
    rnn = make(3, 4, 2, bidirectional=True, rng=np.random.default_rng(8))
    assert list(rnn.state_dict()) == list(make_torch(3, 4, 2, bidirectional=True).state_dict())
    twin = torch_twin(rnn, make_torch, torch.float32, bidirectional=True)  # strict
    other = make_torch(3, 4, 2, bidirectional=True)
    rnn.load_state_dict({k: v.detach().numpy() for k, v in other.state_dict().items()})
    for name, value in other.state_dict().items():
        np.testing.assert_array_equal(rnn.params[name], value.numpy())
    assert twin.weight_ih_l0.shape == rnn.params["weight_ih_l0"].shape


def test_initialisation_is_uniform_within_one_over_sqrt_hidden():
    rnn = LSTM(10, 16, 2, rng=np.random.default_rng(0))
    values = np.concatenate([p.ravel() for _, p in rnn.named_parameters()])
    assert values.dtype == np.float32 and np.abs(values).max() <= 0.25 and np.abs(values).max() > 0.24


def test_dropout_only_in_training():
    rng = np.random.default_rng(9)
    rnn = GRU(3, 4, 2, dropout=0.5, rng=rng)
    plain = GRU(3, 4, 2, rng=rng)
    plain.load_state_dict(rnn.state_dict())
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    assert not np.allclose(rnn.forward(x)[0], plain.forward(x)[0])
    rnn.eval()
    np.testing.assert_array_equal(rnn.forward(x)[0], plain.forward(x)[0])


# -- bad input -------------------------------------------------------------------------------
def test_bad_input_is_refused_naming_layer_and_shapes():
    lstm = LSTM(3, 4, 2)
    with pytest.raises(ShapeError, match=r"LSTM\(3, 4, num_layers=2\): expected a 3-D input \(T, B, input_size\) "
                                         r"with input_size 3, got shape \(5, 3\)"):
        lstm.forward(np.zeros((5, 3), np.float32))
    with pytest.raises(ShapeError, match=r"input_size 3, got shape \(5, 2, 7\)"):
        lstm.forward(np.zeros((5, 2, 7), np.float32))
    with pytest.raises(ShapeError, match=r"expected the state as a tuple \(h0, c0\)"):
        lstm.forward(np.zeros((5, 2, 3), np.float32), np.zeros((2, 2, 4), np.float32))
    with pytest.raises(ShapeError, match=r"expected c0 of shape .* = \(2, 2, 4\), got \(1, 2, 4\)"):
        lstm.forward(np.zeros((5, 2, 3), np.float32), (np.zeros((2, 2, 4)), np.zeros((1, 2, 4))))
    gru = GRU(3, 4, batch_first=True)
    with pytest.raises(ShapeError, match=r"GRU\(3, 4, batch_first=True\): expected h0 of shape .* = \(1, 5, 4\)"):
        gru.forward(np.zeros((5, 2, 3), np.float32), np.zeros((1, 2, 4), np.float32))
    output, _ = gru.forward(np.zeros((5, 2, 3), np.float32))
    with pytest.raises(ShapeError, match=r"backward expected dh_n of the final state's shape \(1, 5, 4\)"):
        gru.backward(np.zeros_like(output), np.zeros((1, 2, 4), np.float32))
    output, _ = gru.forward(np.zeros((5, 2, 3), np.float32))
    with pytest.raises(ShapeError, match=r"backward expected dy of the output's shape \(5, 2, 4\), got \(2, 5, 4\)"):
        gru.backward(np.zeros((2, 5, 4), np.float32))
    with pytest.raises(ValueError, match="nonlinearity"):
        RNN(3, 4, nonlinearity="sigmoid")


def test_backward_without_forward_or_after_no_grad_fails():
    rnn = RNN(3, 4)
    with mnn.no_grad():
        output, _ = rnn.forward(np.zeros((2, 1, 3), np.float32))
    with pytest.raises(RuntimeError, match="no_grad"):
        rnn.backward(output)


@pytest.mark.parametrize("batch, k, n", [(6, 256, 1024), (16, 1024, 256), (2, 8, 12), (33, 64, 96)])
def test_the_time_loops_block_product_equals_one_product(batch, k, n):
    from mnn.layers.rnn import SMALL_PRODUCT, StepProduct

    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((k, n)), rng.standard_normal((batch, k))
    product = StepProduct(w.T.copy().T, batch)  # a transposed view, as the layers pass W_hh^T
    widths = {j1 - j0 for j0, j1, _ in product.blocks}
    assert all(block.flags.c_contiguous for _, _, block in product.blocks)
    assert len(product.blocks) == 1 or max(widths) * batch * k <= SMALL_PRODUCT
    out = np.empty((batch, n))
    np.testing.assert_allclose(product(x, out), x @ w, rtol=1e-12, atol=1e-12)


# -- the LSTM's compiled time loops (mnn.layers.lstm_compiled) --------------------------------
def test_compiled_tanh_is_within_a_few_ulp_of_the_exact_one():
    from mnn.layers import lstm_compiled

    probe = np.zeros(1, np.float32)
    if not lstm_compiled.can_run(probe):
        pytest.skip("numba or OpenBLAS's ILP64 sgemm missing: the numpy loops run")
    positive = np.concatenate([
        np.linspace(0, 12, 1_000_001, dtype=np.float32),
        np.logspace(-30, 1.2, 100_001, dtype=np.float32),
        # one float32 in 7 between 1e-3 and 10: every exponent, mantissas spread
        np.arange(np.float32(1e-3).view(np.int32), np.float32(10).view(np.int32), 7, dtype=np.int32).view(np.float32),
        np.array([1e-45, 1e-38, 9.4999, 9.5, 9.5001, 20, 3.4e38, np.inf], np.float32)])
    x = np.concatenate([positive, -positive])
    got = lstm_compiled.tanh_float32(x)
    assert got.dtype == np.float32
    exact = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact.astype(np.float32))).astype(np.float64)
    errors = np.abs(got - exact) / ulp
    assert errors.max() <= 2.5, (errors.max(), x[np.argmax(errors)])  # numpy's float32 tanh: 1.4 here
    np.testing.assert_array_equal(got[:len(positive)], -got[len(positive):])  # odd
    assert np.isnan(lstm_compiled.tanh_float32(np.array([np.nan], np.float32))).all()


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("hidden, batch, bias", [(5, 3, True), (16, 3, True), (64, 3, True), (64, 12, False)])
def test_compiled_lstm_loops_equal_the_numpy_loops(hidden, batch, bias, bidirectional):
    """The compiled loops against the reference, float32: BLAS blocks of 32 columns (H 64; W_hh^T's 4H for
    16), one block (5, and W_hh's H columns for 16), with and without biases, states and gradients entering
    through the final state."""
    from mnn import jit
    from mnn.layers import lstm_compiled

    if not lstm_compiled.can_run(np.zeros(1, np.float32)):
        pytest.skip("numba or OpenBLAS's ILP64 sgemm missing: the numpy loops run")
    rng = np.random.default_rng(11)
    x = rng.standard_normal((9, batch, 7)).astype(np.float32)
    D = 2 if bidirectional else 1
    state0 = tuple(rng.standard_normal((2 * D, batch, hidden)).astype(np.float32) for _ in range(2))
    doutput = rng.standard_normal((9, batch, D * hidden)).astype(np.float32)
    dfinal = tuple(rng.standard_normal((2 * D, batch, hidden)).astype(np.float32) for _ in range(2))
    results = []
    for compiled in (True, False):
        previous = jit.set_enabled(compiled)
        try:
            lstm = LSTM(7, hidden, 2, bias=bias, bidirectional=bidirectional, rng=np.random.default_rng(12))
            output, final = lstm.forward(x, state0)
            dx, dstate0 = lstm.backward(doutput, dfinal)
        finally:
            jit.set_enabled(previous)
        results.append([output, *final, dx, *dstate0, *(lstm.grads[k] for k in sorted(lstm.grads))])
    for mine, reference in zip(*results):
        assert mine.dtype == np.float32
        assert rel(mine, reference) <= 2e-6


def test_without_openblas_sgemm_the_lstm_takes_the_numpy_loops(monkeypatch):
    """Where no ILP64 sgemm is found (another BLAS), ``can_run`` is False and the reference loops run."""
    from mnn import blas, jit
    from mnn.layers import lstm_compiled

    def refuse(*args):
        raise AssertionError("the compiled loops ran without sgemm")

    monkeypatch.setattr(lstm_compiled, "_ready", None)
    monkeypatch.setattr(blas, "sgemm_address", lambda *name: None)
    monkeypatch.setattr(lstm_compiled, "forward_loop", refuse)
    monkeypatch.setattr(lstm_compiled, "backward_loop", refuse)
    previous = jit.set_enabled(True)
    try:
        assert not lstm_compiled.can_run(np.zeros((2, 3), np.float32))
        lstm = LSTM(3, 4, rng=np.random.default_rng(14))
        output, _ = lstm.forward(np.random.default_rng(13).standard_normal((4, 2, 3)).astype(np.float32))
        dx, _ = lstm.backward(np.ones_like(output))
    finally:
        jit.set_enabled(previous)
    assert np.isfinite(dx).all() and np.abs(lstm.grads["weight_hh_l0"]).sum() > 0
