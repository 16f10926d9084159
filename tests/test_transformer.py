"""The Transformer layers: finite-difference gradient checks in float64 and parity with PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import mnn
from mnn.backend import to_numpy
from mnn.errors import InputError, ShapeError
from mnn.layers import GELU, Embedding, LayerNorm, MultiHeadAttention
from mnn.models.gpt import MLP, Block

DTYPES = [(np.float32, torch.float32, 1e-5), (np.float64, torch.float64, 1e-10)]


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b.detach().numpy() if isinstance(b, torch.Tensor) else b, dtype=np.float64).ravel()
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def randn(rng, shape, dtype=np.float64, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def perturb_params(layer, rng):
    """Random parameters (LayerNorm's 1 and 0 would hide a mistake in gamma or beta)."""
    for _, param in layer.named_parameters():
        param[...] = randn(rng, param.shape, param.dtype, scale=0.5)


def torch_params(layer, dtype):
    return {name: torch.tensor(np.array(p), dtype=dtype, requires_grad=True) for name, p in layer.named_parameters()}


# -- Embedding ---------------------------------------------------------------------
def test_embedding_gradcheck_with_repeated_ids():
    rng = np.random.default_rng(0)
    layer = Embedding(7, 3, rng=rng, dtype=np.float64)
    ids = np.array([[0, 3, 3, 6], [3, 1, 0, 0]])
    errors = mnn.gradcheck(layer, (ids,), seed=5)
    assert errors["weight"] < 1e-7


@pytest.mark.parametrize("np_dtype, torch_dtype, tol", DTYPES)
@pytest.mark.parametrize("V, shape", [(65, (12, 64)), (1000, (3, 5)), (5, (40,))])
def test_embedding_matches_pytorch(np_dtype, torch_dtype, tol, V, shape):
    rng = np.random.default_rng(1)
    layer = Embedding(V, 16, rng=rng, dtype=np_dtype)
    ids = rng.integers(0, V, shape)
    dy = randn(rng, (*shape, 16), np_dtype)
    y = layer.forward(ids)
    layer.grads["weight"][...] = 1.0  # gradients must accumulate, not overwrite
    assert layer.backward(dy) is None
    weight = torch.tensor(np.array(layer.params["weight"]), requires_grad=True)
    F.embedding(torch.from_numpy(ids), weight).backward(torch.from_numpy(dy))
    assert y.dtype == np_dtype and y.shape == (*shape, 16)
    assert rel(y, F.embedding(torch.from_numpy(ids), weight)) == 0.0
    assert rel(layer.grads["weight"] - 1.0, weight.grad) <= tol


def test_embedding_refuses_bad_ids_naming_layer_and_id():
    layer = Embedding(10, 4)
    # On a device the range check waits for the next value read back (to_numpy); on the CPU it raises at once.
    with pytest.raises(InputError, match=r"Embedding\(10, 4\).*id 10 out of range \[0, 10\)"):
        to_numpy(layer.forward(np.array([[1, 10]])))
    with pytest.raises(InputError, match="id -1"):
        to_numpy(layer.forward(np.array([-1, 2])))
    with pytest.raises(ShapeError, match="integer"):
        layer.forward(np.array([1.0, 2.0]))


# -- LayerNorm ---------------------------------------------------------------------
@pytest.mark.parametrize("shape, bias", [((2, 3, 5), True), ((4, 6), True), ((2, 2, 4), False)])
def test_layernorm_gradcheck(shape, bias, compute_path):
    rng = np.random.default_rng(2)
    layer = LayerNorm(shape[-1], bias=bias, dtype=np.float64)
    perturb_params(layer, rng)
    mnn.gradcheck(layer, (randn(rng, shape, scale=2.0) + 0.5,), seed=7)


@pytest.mark.parametrize("np_dtype, torch_dtype, tol", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_pytorch(np_dtype, torch_dtype, tol, bias, compute_path):
    rng = np.random.default_rng(3)
    layer = LayerNorm(32, bias=bias, dtype=np_dtype)
    perturb_params(layer, rng)
    x, dy = randn(rng, (4, 8, 32), np_dtype, 3.0) + 1.0, randn(rng, (4, 8, 32), np_dtype)
    y = layer.forward(x)
    dx = layer.backward(dy)
    params = torch_params(layer, torch_dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = F.layer_norm(xt, (32,), params["weight"], params.get("bias"), 1e-5)
    yt.backward(torch.from_numpy(dy))
    assert y.dtype == dx.dtype == np_dtype
    assert rel(y, yt) <= tol and rel(dx, xt.grad) <= tol
    for name, grad in layer.named_grads():
        assert rel(grad, params[name].grad) <= tol, name


def assert_no_grad_keeps_nothing(layer, x):
    """Under no_grad the forward gives the same output and keeps no cache, and backward names no_grad;
    evaluation mode alone still backpropagates, as in PyTorch."""
    expected = layer.forward(x)
    dx = layer.backward(np.ones_like(x))
    layer.eval()
    np.testing.assert_array_equal(layer.forward(x), expected)
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)), dx)
    with mnn.no_grad():
        assert not mnn.grad_enabled()
        np.testing.assert_array_equal(layer.forward(x), expected)
    assert mnn.grad_enabled() and layer.cache is None
    with pytest.raises(RuntimeError, match="no_grad"):
        layer.backward(np.ones_like(x))


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_under_no_grad_keeps_nothing_and_gives_the_same_output(bias, compute_path):
    rng = np.random.default_rng(6)
    layer = LayerNorm(16, bias=bias, dtype=np.float32)
    perturb_params(layer, rng)
    x = randn(rng, (3, 5, 16), np.float32, 2.0) + 0.5
    assert_no_grad_keeps_nothing(layer, x)


# -- GELU --------------------------------------------------------------------------
def test_gelu_gradcheck(compute_path):
    rng = np.random.default_rng(4)
    mnn.gradcheck(GELU(), (randn(rng, (3, 4, 5), scale=3.0),), seed=1)


@pytest.mark.parametrize("np_dtype, torch_dtype, tol", DTYPES)
def test_gelu_matches_pytorch_tanh_approximation(np_dtype, torch_dtype, tol, compute_path):
    rng = np.random.default_rng(5)
    x, dy = randn(rng, (16, 64), np_dtype, 4.0), randn(rng, (16, 64), np_dtype)
    layer = GELU()
    y = layer.forward(x)
    dx = layer.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = F.gelu(xt, approximate="tanh")
    yt.backward(torch.from_numpy(dy))
    assert y.dtype == dx.dtype == np_dtype
    assert rel(y, yt) <= tol and rel(dx, xt.grad) <= tol


def test_gelu_under_no_grad_keeps_nothing_and_says_so_on_backward(compute_path):
    x = np.linspace(-3, 3, 12).reshape(3, 4)
    layer = GELU()
    assert_no_grad_keeps_nothing(layer, x)


def test_gelu_float32_loop_is_within_its_stated_error_and_exact_at_the_limits():
    """The one-pass float32 forward (Eq. 4's rational tanh): the gate within 3e-7 of float64's on [-15, 15],
    y within 2e-6, and PyTorch's values at +-20, +-inf and NaN."""
    from mnn.layers import gelu

    x = np.linspace(-15.0, 15.0, 600_001, dtype=np.float32)
    gate, y = np.empty_like(x), np.empty_like(x)
    gelu._gelu_float32_kernel(x, gate, y)
    exact = 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x.astype(np.float64) + 0.044715 * x.astype(np.float64) ** 3)))
    assert np.abs(gate - exact).max() <= 3e-7
    assert np.abs(y - x * exact).max() <= 2e-6
    edges = np.array([-np.inf, np.inf, np.nan, -20.0, 20.0, -1e20, 1e20], dtype=np.float32)
    gate, y = np.empty_like(edges), np.empty_like(edges)
    with np.errstate(invalid="ignore", over="ignore"):
        gelu._gelu_float32_kernel(edges, gate, y)
    expected = F.gelu(torch.from_numpy(edges), approximate="tanh").numpy()
    assert np.array_equal(y, expected, equal_nan=True) and np.array_equal(np.signbit(y), np.signbit(expected))


def test_gelu_tanh_coefficients_are_the_fit_of_tools_fit_tanh():
    """The rational tanh's coefficients are what tools/fit_tanh.py derives, and within 6 ulp in float32."""
    import importlib.util
    from pathlib import Path

    from mnn.layers import gelu

    path = Path(__file__).resolve().parent.parent / "tools" / "fit_tanh.py"
    spec = importlib.util.spec_from_file_location("fit_tanh", path)
    fit_tanh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_tanh)
    p, q, error = fit_tanh.fit()
    assert error < 1e-8 and fit_tanh.LIMIT == gelu._TANH_LIMIT
    np.testing.assert_allclose(p, gelu._TANH_P, rtol=1e-5)
    np.testing.assert_allclose(q, gelu._TANH_Q, rtol=1e-5)
    u = np.linspace(-9.0, 9.0, 400_001, dtype=np.float32)
    p32, q32 = np.float32(gelu._TANH_P), np.float32(gelu._TANH_Q)
    assert fit_tanh.ulps(fit_tanh.tanh32(u, p32, q32), u).max() <= 6.0


# -- attention ---------------------------------------------------------------------
def torch_attention(layer, x, dtype, causal):
    """The same attention through torch's fused scaled_dot_product_attention (a different algorithm)."""
    params = torch_params(layer, dtype)
    B, T, C = x.shape
    NH = layer.n_head
    xt = torch.tensor(x, requires_grad=True)
    qkv = F.linear(xt, params["c_attn.weight"], params.get("c_attn.bias"))
    q, k, v = (t.reshape(B, T, NH, C // NH).transpose(1, 2) for t in qkv.split(C, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, T, C)
    return xt, params, F.linear(y, params["c_proj.weight"], params.get("c_proj.bias"))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B, T, C, NH", [(2, 4, 8, 2), (1, 5, 6, 3), (2, 3, 4, 1)])
def test_attention_gradcheck(causal, B, T, C, NH):
    rng = np.random.default_rng(6)
    layer = MultiHeadAttention(C, NH, causal=causal, rng=rng, dtype=np.float64)
    mnn.gradcheck(layer, (randn(rng, (B, T, C)),), seed=2)


@pytest.mark.parametrize("causal_block", [1, 2, 3])
def test_attention_gradcheck_over_causal_blocks(causal_block):
    """Eqs. (7)-(10): the products over the blocks on and below the diagonal, uneven last block included."""
    rng = np.random.default_rng(16)
    layer = MultiHeadAttention(6, 3, rng=rng, dtype=np.float64)
    layer.causal_block = causal_block
    assert layer.blocks(5) is not None and layer.blocks(5)[-1][1] == 5
    mnn.gradcheck(layer, (randn(rng, (2, 5, 6)),), seed=4)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_causal_blocks_equal_the_full_products(dropout):
    rng = np.random.default_rng(17)
    layer = MultiHeadAttention(16, 2, dropout=dropout, rng=rng, dtype=np.float64)
    x, dy = randn(rng, (3, 11, 16)), randn(rng, (3, 11, 16))
    results = []
    for block in (64, 4):  # one block (MatrixProduct's full products), then three
        layer.causal_block = block
        layer.attn_dropout.rng, layer.resid_dropout.rng = np.random.default_rng(1), np.random.default_rng(2)
        y = layer.forward(x)
        assert (layer.cache[2] is None) == (block == 64)
        if block == 4:  # row blocks keep each block's weights (Eq. 11's path), unless dropout needs them whole
            kept = layer.cache[2][-1]
            shapes = [(3, 2, 4, 4), (3, 2, 4, 8), (3, 2, 3, 11)]
            assert ([w.shape for w in kept] == shapes) if dropout == 0.0 else (kept.shape == (3, 2, 11, 11))
        dx = layer.backward(dy)
        results.append([y, dx] + [grad.copy() for _, grad in layer.named_grads()])
        layer.zero_grad()
    for full, blocked in zip(*results):
        assert rel(blocked, full) <= 1e-13


def test_attention_gradcheck_with_dropout():
    rng = np.random.default_rng(7)
    layer = MultiHeadAttention(8, 2, dropout=0.3, rng=rng, dtype=np.float64)

    def reseed():
        layer.attn_dropout.rng = np.random.default_rng(11)
        layer.resid_dropout.rng = np.random.default_rng(12)

    x = randn(rng, (2, 5, 8))
    mnn.gradcheck(layer, (x,), seed=3, before_forward=reseed)
    reseed()
    dropped = layer.forward(x)
    layer.eval()
    assert rel(dropped, layer.forward(x)) > 1e-3  # the masks really dropped something


@pytest.mark.parametrize("np_dtype, torch_dtype, tol", DTYPES)
@pytest.mark.parametrize("causal, causal_block", [(True, 64), (True, 4), (False, 4)])
def test_attention_matches_pytorch(np_dtype, torch_dtype, tol, causal, causal_block):
    rng = np.random.default_rng(8)
    layer = MultiHeadAttention(32, 4, causal=causal, rng=rng, dtype=np_dtype)
    layer.causal_block = causal_block  # 4: Eqs. (7)-(10) over three blocks of T = 10 when causal
    x, dy = randn(rng, (3, 10, 32), np_dtype), randn(rng, (3, 10, 32), np_dtype)
    y = layer.forward(x)
    dx = layer.backward(dy)
    xt, params, yt = torch_attention(layer, x, torch_dtype, causal)
    yt.backward(torch.from_numpy(dy))
    assert y.dtype == dx.dtype == np_dtype
    assert rel(y, yt) <= tol and rel(dx, xt.grad) <= tol
    for name, grad in layer.named_grads():
        assert rel(grad, params[name].grad) <= tol, name


def test_attention_is_causal_and_key_bias_gradient_vanishes():
    rng = np.random.default_rng(9)
    layer = MultiHeadAttention(8, 2, rng=rng, dtype=np.float64)
    perturb_params(layer, rng)
    x = randn(rng, (2, 6, 8))
    y = layer.forward(x)
    later = x.copy()
    later[:, 4:] += 1.0
    assert np.array_equal(layer.forward(later)[:, :4], y[:, :4])  # the past never sees the future
    layer.backward(randn(rng, (2, 6, 8)))
    bias_grad = layer.c_attn.grads["bias"]
    assert np.abs(bias_grad[8:16]).max() <= 1e-12 * np.abs(bias_grad).max()  # softmax ignores q.b_k


def test_attention_refuses_bad_shapes():
    layer = MultiHeadAttention(8, 2)
    with pytest.raises(ShapeError, match=r"MultiHeadAttention.*\(2, 3, 6\)"):
        layer.forward(np.zeros((2, 3, 6), dtype=np.float32))
    with pytest.raises(ShapeError, match="3-D"):
        layer.forward(np.zeros((3, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(8, 3)


def test_attention_forward_cached_equals_forward():
    rng = np.random.default_rng(10)
    layer = MultiHeadAttention(12, 3, rng=rng, dtype=np.float64)
    x = randn(rng, (2, 7, 12))
    full = layer.forward(x)
    first, past = layer.forward_cached(x[:, :4])
    second, past = layer.forward_cached(x[:, 4:], past)
    assert rel(np.concatenate([first, second], axis=1), full) <= 1e-14
    assert past[0].shape == (2, 3, 7, 4)


# -- MLP and Block -------------------------------------------------------------------
def test_mlp_and_block_gradcheck():
    rng = np.random.default_rng(11)
    mnn.gradcheck(MLP(6, rng=rng, dtype=np.float64), (randn(rng, (2, 3, 6)),), seed=4)
    block = Block(8, 2, rng=rng, dtype=np.float64)
    perturb_params(block, rng)
    mnn.gradcheck(block, (randn(rng, (2, 4, 8)),), seed=5)


def test_block_gradcheck_with_dropout():
    rng = np.random.default_rng(12)
    block = Block(8, 2, dropout=0.25, rng=rng, dtype=np.float64)
    dropouts = [m for _, m in block.named_modules() if type(m).__name__ == "Dropout"]
    assert len(dropouts) == 3

    def reseed():
        for i, layer in enumerate(dropouts):
            layer.rng = np.random.default_rng(100 + i)

    mnn.gradcheck(block, (randn(rng, (2, 4, 8)),), seed=6, before_forward=reseed)


@pytest.mark.parametrize("np_dtype, torch_dtype, tol", DTYPES)
def test_block_matches_pytorch(np_dtype, torch_dtype, tol):
    rng = np.random.default_rng(13)
    block = Block(16, 4, rng=rng, dtype=np_dtype)
    perturb_params(block, rng)
    x, dy = randn(rng, (2, 9, 16), np_dtype), randn(rng, (2, 9, 16), np_dtype)
    y = block.forward(x)
    dx = block.backward(dy)

    params = torch_params(block, torch_dtype)
    xt = torch.tensor(x, requires_grad=True)
    p = params
    h = F.layer_norm(xt, (16,), p["ln_1.weight"], p["ln_1.bias"], 1e-5)
    q, k, v = F.linear(h, p["attn.c_attn.weight"], p["attn.c_attn.bias"]).split(16, dim=2)
    q, k, v = (t.reshape(2, 9, 4, 4).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(4)
    att = att.masked_fill(torch.triu(torch.ones(9, 9, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    a = (att @ v).transpose(1, 2).reshape(2, 9, 16)
    h1 = xt + F.linear(a, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    m = F.layer_norm(h1, (16,), p["ln_2.weight"], p["ln_2.bias"], 1e-5)
    m = F.gelu(F.linear(m, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"]), approximate="tanh")
    yt = h1 + F.linear(m, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    yt.backward(torch.from_numpy(dy))

    assert y.dtype == dx.dtype == np_dtype
    assert rel(y, yt) <= tol and rel(dx, xt.grad) <= tol
    for name, grad in block.named_grads():
        assert rel(grad, params[name].grad) <= tol, name


def test_causal_mask_offsets_for_cached_keys():
    layer = MultiHeadAttention(4, 2)
    inf = -np.inf
    assert np.array_equal(layer.causal_mask(3, dtype=np.float64),
                          [[0, inf, inf], [0, 0, inf], [0, 0, 0]])
    assert np.array_equal(layer.causal_mask(2, 4, dtype=np.float64), [[0, 0, 0, inf], [0, 0, 0, 0]])
    assert layer.causal_mask(2, dtype=np.float32).dtype == np.float32
