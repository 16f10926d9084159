"""The device tests: every layer on the active device (CuPy, or the strict stand-in) against its own CPU result.

Skipped on the CPU. ``tools/device_check.sh`` runs them with ``MNN_DEVICE=gpu``
on a GPU machine, and its dry run (a CI test) with ``MNN_DEVICE=strict``.
"""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from mnn import backend, jit
from mnn.backend import asarray, read_scalar, to_numpy, xp
from mnn.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gradcheck_report  # noqa: E402

pytestmark = pytest.mark.skipif(backend.device == "cpu", reason="device tests: run with MNN_DEVICE=gpu (or strict)")
DEVICE = backend.device
# float64 on both sides: CuPy's kernels may sum in another order than numpy (cuBLAS, tree reductions)
RTOL = 0.0 if DEVICE == "strict" else 1e-10


def on(device: str) -> None:
    """Switch the array module in this process (the device tests compare both)."""
    backend.use(device)


@pytest.fixture(autouse=True)
def back_to_the_device():
    yield
    on(DEVICE)


def run_case(name: str, device: str) -> dict:
    """Forward and backward of one gradient-check case on ``device``: output, input gradients, parameter gradients."""
    on(device)
    previous = backend.default_dtype()
    backend.set_default_dtype(np.float64)
    try:
        module_name, class_name = name.rsplit(".", 1)
        case = gradcheck_report.CASES[name]
        layer = case.build(importlib.import_module(f"mnn.{module_name}"), np.random.default_rng(0))
        if case.reseed:
            layer.rng = np.random.default_rng(2)
        inputs = tuple(asarray(x) for x in case.inputs(np.random.default_rng(1)))
        out = layer.forward(*inputs)
        upstream = asarray(np.random.default_rng(3).standard_normal(out.shape)) if out.ndim else 1.0
        dx = layer.backward(upstream)
        dx = dx if isinstance(dx, tuple) else (dx,)
        result = {"out": to_numpy(out)}
        result.update({f"d{i}": to_numpy(g) for i, g in enumerate(dx) if g is not None})
        result.update({f"grad {k}": to_numpy(g) for k, g in layer.named_grads()})
        return result
    finally:
        backend.set_default_dtype(previous)


@pytest.mark.parametrize("name", sorted(gradcheck_report.CASES))
def test_every_layer_computes_on_the_device_what_it_computes_on_the_cpu(name):
    previous = jit.set_enabled(False)  # the numpy path on the CPU: the device runs the same equations
    try:
        host = run_case(name, "cpu")
    finally:
        jit.set_enabled(previous)
    device = run_case(name, DEVICE)
    assert host.keys() == device.keys()
    for key in host:
        np.testing.assert_allclose(device[key], host[key], rtol=RTOL, atol=RTOL, err_msg=f"{name}: {key}")


def test_every_layer_passes_its_gradient_check_on_the_device():
    results = gradcheck_report.measure()
    worst = {name: entry["max_rel_error"] for name, entry in results.items()
             if entry["max_rel_error"] > gradcheck_report.TOLERANCE}
    assert results and not worst, worst


def test_token_ids_and_targets_are_checked_before_indexing_on_the_device():
    from mnn.layers import Embedding  # noqa: PLC0415
    from mnn.losses import CrossEntropyLoss  # noqa: PLC0415

    # On the device the checks take no read-back of their own: they ride along with the next value read.
    rows = Embedding(5, 3).forward(asarray(np.array([[0, 7]])))
    with pytest.raises(InputError, match="id 7 out of range"):
        to_numpy(rows)
    rows = Embedding(5, 3).forward(asarray(np.array([[-1, 2]])))
    with pytest.raises(InputError, match="id -1 out of range"):
        read_scalar(rows.sum())
    logits = xp.zeros((2, 4), dtype=xp.float32)
    with pytest.raises(InputError, match="target class 4 out of range"):
        read_scalar(CrossEntropyLoss().forward(logits, asarray(np.array([1, 4]))))
    assert read_scalar(CrossEntropyLoss().forward(logits, asarray(np.array([1, 3])))) == pytest.approx(np.log(4))


def test_gpt_training_steps_on_the_device_track_the_cpu():
    from mnn.losses import CrossEntropyLoss  # noqa: PLC0415
    from mnn.models.gpt import GPT, GPTConfig  # noqa: PLC0415
    from mnn.optim import AdamW, clip_grad_norm, param_groups  # noqa: PLC0415

    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 11, (3, 8)), rng.integers(0, 11, (3, 8))) for _ in range(4)]

    def losses(device):
        on(device)
        model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16), seed=0)
        optimizer, loss_fn, seen = AdamW(param_groups(model, 0.1), lr=1e-2), CrossEntropyLoss(), []
        for x, y in batches:
            model.zero_grad()
            seen.append(float(loss_fn.forward(model.forward(asarray(x)), asarray(y))))
            model.backward(loss_fn.backward())
            clip_grad_norm(model.named_grads(), 1.0)
            optimizer.step()
        return seen

    previous = jit.set_enabled(False)
    try:
        host = losses("cpu")
    finally:
        jit.set_enabled(previous)
    device = losses(DEVICE)
    np.testing.assert_allclose(device, host, rtol=0.0 if DEVICE == "strict" else 1e-4)
    assert device[-1] < device[0]


def test_causal_attention_by_row_blocks_on_the_device():
    """Eqs. (7)-(11) of MultiHeadAttention (T above the block size) on the device equal the CPU's numpy path."""
    from mnn.layers import MultiHeadAttention  # noqa: PLC0415

    def run(device):
        on(device)
        rng = np.random.default_rng(5)
        layer = MultiHeadAttention(16, 2, rng=rng, dtype=np.float64)
        layer.causal_block = 4  # three row blocks of T = 11, the last one short
        x, dy = rng.standard_normal((3, 11, 16)), rng.standard_normal((3, 11, 16))
        out = layer.forward(asarray(x))
        assert isinstance(layer.cache[2][-1], list)  # the row blocks' path
        dx = layer.backward(asarray(dy))
        return [to_numpy(out), to_numpy(dx)] + [to_numpy(g) for _, g in layer.named_grads()]

    previous = jit.set_enabled(False)
    try:
        host = run("cpu")
    finally:
        jit.set_enabled(previous)
    for got, want in zip(run(DEVICE), host):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL)
