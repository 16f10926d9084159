"""mnn.blas: the library products run on (numpy's OpenBLAS, or MKL when chosen) and its in-place layouts."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mnn import blas
from mnn.backend import xp
from mnn.models.gpt import GPT, GPTConfig
from mnn.losses import CrossEntropyLoss

needs_mkl = pytest.mark.skipif(blas.mkl_path() is None, reason="MKL is not installed (pip install 'mnn[mkl]')")
RNG = np.random.default_rng(2026)


def normal(*shape):
    return RNG.standard_normal(shape, dtype=np.float32)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture
def mkl(monkeypatch):
    """MKL chosen and one thread (as inside a replica), both undone after the test."""
    if xp._module is not np:
        pytest.skip("numpy arrays only")
    monkeypatch.setattr(blas, "_library", "mkl")
    monkeypatch.setattr(blas, "_threads", 1)
    return blas


def test_numpy_is_the_default_and_a_bad_name_is_one_line(monkeypatch):
    monkeypatch.setattr(blas, "_library", None)
    monkeypatch.delenv("MNN_BLAS", raising=False)
    assert blas.library() == "numpy"
    monkeypatch.setattr(blas, "_library", None)
    monkeypatch.setenv("MNN_BLAS", "atlas")
    with pytest.raises(ValueError, match=r"MNN_BLAS='atlas' is not a BLAS mnn knows: expected one of"):
        blas.library()
    with pytest.raises(ValueError, match="blas.use: 'atlas'"):
        blas.use("atlas")


def test_mkl_missing_is_one_line(monkeypatch):
    monkeypatch.setattr(blas, "_library", "numpy")
    monkeypatch.setattr(blas, "_found", {})
    monkeypatch.setattr(blas, "mkl_path", lambda: None)
    with pytest.raises(RuntimeError, match=r"libmkl_rt was not found; install it with pip install 'mnn\[mkl\]'"):
        blas.use("mkl")
    assert blas.library() == "numpy"  # nothing changed


def layouts():
    """(name, a, b, out) with every layout sgemm reads in place, as the layers multiply."""
    B, T, NH, hs = 3, 40, 4, 32
    C = NH * hs
    q, k, v = normal(B * T, 3 * C).reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # attention's views
    merged = np.empty((B, T, C), np.float32)
    return [
        ("a b", normal(300, 200), normal(200, 100), None),
        ("a^T b", normal(200, 300).T, normal(200, 100), None),
        ("a b^T", normal(300, 200), normal(100, 200).T, None),
        ("a^T b^T", normal(200, 300).T, normal(100, 200).T, None),
        ("rows by a matrix", normal(4, 80, 200), normal(100, 200).T, None),
        ("stack", normal(6, 128, 96), normal(6, 96, 128), None),
        ("heads q k^T", q, np.swapaxes(k, -1, -2), None),
        ("heads a v into merged", normal(B, NH, T, T), v, merged.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)),
        ("heads a^T g", np.swapaxes(normal(B, NH, T, T), -1, -2), normal(B, NH, T, hs), None),
    ]


@needs_mkl
@pytest.mark.parametrize("name, a, b, out", layouts(), ids=[case[0] for case in layouts()])
def test_mkl_products_equal_numpy_in_every_layout(mkl, name, a, b, out, monkeypatch):
    monkeypatch.setattr(blas, "MIN_MATRIX", 1)  # small test shapes take MKL's path too
    calls = []
    real = blas._multiply
    monkeypatch.setattr(blas, "_multiply", lambda *args: calls.append(1) or real(*args))
    got = blas.matmul(a, b, out=out)
    assert calls, "MKL's path did not run"
    if out is not None:
        assert got is out
    expected = np.matmul(a.astype(np.float64), b.astype(np.float64))
    assert relative_error(got, expected) <= 1e-6, name


@needs_mkl
def test_mkl_accumulates_a_weight_gradient(mkl):
    g, x = normal(512, 256), normal(512, 784)
    grad = normal(256, 784)
    expected = grad.astype(np.float64) + g.astype(np.float64).T @ x.astype(np.float64)
    assert blas.can_accumulate(grad, g, x)
    blas.add_at_b(grad, g, x)
    assert relative_error(grad, expected) <= 1e-6


def test_add_at_b_refuses_shapes_that_do_not_fit():
    """sgemm reads and writes by the sizes it is given: a mismatch must not reach it (it corrupted memory)."""
    grad = np.zeros((256, 784), np.float32)
    with pytest.raises(ValueError, match=r"add_at_b: out \(256, 784\) \+= a.T @ b with a \(256, 512\) and b"):
        blas.add_at_b(grad, normal(512, 256).T, normal(512, 784))
    assert not grad.any()


@needs_mkl
def test_mkl_runs_on_one_thread_only_and_leaves_the_rest_to_numpy(mkl, monkeypatch):
    """With more threads than one (a single process) the product is numpy's own, bit for bit; float64,
    small products and layouts sgemm cannot read are numpy's too."""
    a, b = normal(300, 200), normal(200, 100)
    monkeypatch.setattr(blas, "_multiply", lambda *args: pytest.fail("MKL's path ran"))
    monkeypatch.setattr(blas, "_threads", 2)
    assert np.array_equal(blas.matmul(a, b), a @ b)
    monkeypatch.setattr(blas, "_threads", 1)
    assert np.array_equal(blas.matmul(a.astype(np.float64), b), a.astype(np.float64) @ b)  # float64
    assert np.array_equal(blas.matmul(a[:4, :8], b[:8, :4]), a[:4, :8] @ b[:8, :4])  # under MIN_MATRIX
    strided = normal(300, 400)[:, ::2]  # every other column: no leading dimension
    assert np.array_equal(blas.matmul(strided, b), strided @ b)


@needs_mkl
def test_mkl_adds_a_product_into_rows_of_a_stack(mkl, monkeypatch):
    """``add_matmul`` (attention's Eq. 11): ``out += a @ b`` into the first rows of each matrix of a stack, one
    batched sgemm with beta = 1; the other rows are left alone."""
    whole, scores, rows = normal(2, 3, 10, 8), normal(2, 3, 4, 6), normal(2, 3, 4, 8)
    before = whole.copy()
    expected = whole[..., :6, :].astype(np.float64) + np.swapaxes(scores, -1, -2).astype(np.float64) @ rows
    ran = []
    real = blas._multiply
    monkeypatch.setattr(blas, "_multiply", lambda *args: ran.append(args[-1]) or real(*args))
    monkeypatch.setattr(blas, "MIN_MATRIX", 1)
    blas.add_matmul(whole[..., :6, :], np.swapaxes(scores, -1, -2), rows)
    assert ran == [1.0]
    assert relative_error(whole[..., :6, :], expected) <= 1e-6 and np.array_equal(whole[..., 6:, :], before[..., 6:, :])


@needs_mkl
@pytest.mark.parametrize("causal_block", [64, 8])  # 8: the row blocks of causal attention (Eqs. 7-11)
def test_a_gpt_step_on_mkl_matches_numpy(mkl, monkeypatch, causal_block):
    """The same GPT step with MKL's products and with numpy's: the loss and every gradient agree to float32."""
    config = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=128)
    idx = np.random.default_rng(1).integers(0, 65, (4, 32))
    targets = np.random.default_rng(2).integers(0, 65, (4, 32))

    def step(library):
        monkeypatch.setattr(blas, "_library", library)
        model, loss_fn = GPT(config, seed=5), CrossEntropyLoss()
        for _, module in model.named_modules():
            if hasattr(module, "causal_block"):
                module.causal_block = causal_block
        loss = float(loss_fn.forward(model.forward(idx), targets))
        model.backward(loss_fn.backward())
        return loss, dict(model.named_grads())

    calls = []
    real = blas._function
    monkeypatch.setattr(blas, "_function", lambda: calls.append(blas._in_use()) or real())
    loss_mkl, grads_mkl = step("mkl")
    assert "mkl" in calls
    loss_numpy, grads_numpy = step("numpy")
    assert abs(loss_mkl - loss_numpy) <= 1e-5 * abs(loss_numpy)
    for name, grad in grads_numpy.items():
        assert relative_error(grads_mkl[name], grad) <= 1e-4, name


@needs_mkl
def test_mkl_in_replica_processes_and_the_compiled_lstm():
    """``MNN_BLAS=mkl`` end to end in a fresh process: two replica processes equal one replica (float32
    rounding), and the compiled LSTM loops, calling MKL's sgemm, equal the numpy loops."""
    script = """
import numpy as np
from mnn import blas, jit
from mnn.layers import LSTM
from mnn.losses import CrossEntropyLoss
from mnn.models.gpt import GPT, GPTConfig
from mnn.parallel import DataParallel

assert blas.library() == "mkl"
config = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=128)
idx = np.random.default_rng(1).integers(0, 65, (8, 32))
grads = []
for replicas in (1, 2):
    model = GPT(config, seed=5)
    parallel = DataParallel(model, CrossEntropyLoss(), replicas=replicas)
    assert parallel.processes == (replicas == 2)
    parallel.forward_backward(idx, np.roll(idx, 1, axis=1))
    parallel.close()
    grads.append(np.concatenate([g.ravel() for _, g in model.named_grads()]))
print("replicas", float(np.linalg.norm(grads[0] - grads[1]) / np.linalg.norm(grads[0])))
x = np.random.default_rng(3).standard_normal((16, 6, 64)).astype(np.float32)
out = []
for compiled in (True, False):
    jit.set_enabled(compiled)
    lstm = LSTM(64, 256, rng=np.random.default_rng(4))
    with blas.limit(1):
        y, _ = lstm.forward(x)
        lstm.backward(np.ones_like(y))
    out.append(np.concatenate([y.ravel(), lstm.grads["weight_hh_l0"].ravel()]))
print("lstm", float(np.linalg.norm(out[0] - out[1]) / np.linalg.norm(out[1])))
"""
    env = {**os.environ, "MNN_BLAS": "mkl"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = dict(line.split() for line in done.stdout.split("\n") if line)
    assert float(figures["replicas"]) <= 1e-5
    assert float(figures["lstm"]) <= 1e-5


@needs_mkl
@pytest.mark.parametrize("groups", [1, 2])
def test_a_convolution_on_mkl_matches_numpy(mkl, monkeypatch, groups):
    """Conv2d's products (Eqs. 3, 4 and 6), grouped or not, through MKL and through numpy."""
    from mnn.layers import Conv2d

    x, dy = normal(8, 4, 12, 12), normal(8, 6, 12, 12)
    monkeypatch.setattr(blas, "MIN_MATRIX", 1)  # small test shapes take MKL's path too
    calls = []
    real = blas._multiply
    monkeypatch.setattr(blas, "_multiply", lambda *args: calls.append(1) or real(*args))
    results = []
    for library in ("mkl", "numpy"):
        monkeypatch.setattr(blas, "_library", library)
        layer = Conv2d(4, 6, 3, padding=1, groups=groups, rng=np.random.default_rng(3))
        y = layer.forward(x)
        dx = layer.backward(dy)
        results.append((y, dx, layer.grads["weight"].copy()))
    assert len(calls) >= 2  # MKL multiplied (the forward and the input gradient at least)
    for ours, theirs in zip(*results):
        assert relative_error(ours, theirs) <= 1e-5
