"""Mixed precision (mnn.precision): bf16/fp16 products with float32 accumulation, against torch.autocast (CPU)."""

import copy

import numpy as np
import pytest
import torch

from mnn import precision
from mnn.backend import xp
from mnn.layers import Linear, MatrixProduct
from mnn.losses import CrossEntropyLoss
from mnn.models.gpt import GPT, GPTConfig
from test_gpt import rel, torch_copy

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16_ULP = 2.0**-7  # one unit in the last place of bf16 at 1 (8 significant bits): where two roundings may differ


@pytest.fixture
def bf16():
    precision.set_compute_dtype("bf16")
    try:
        yield
    finally:
        precision.set_compute_dtype("float32")


def test_float32_is_the_default_and_leaves_products_alone():
    assert precision.compute_dtype() == "float32" and not precision.active()
    rng = np.random.default_rng(0)
    layer = Linear(8, 4, rng=rng)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(layer.forward(x), x @ layer.params["weight"].T + layer.params["bias"])


def test_rounding_is_round_to_nearest_even_as_ml_dtypes_and_torch_on_both_paths(bf16):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(4096).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 4096),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38], np.float32)])
    expected = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(precision.rounded(x), expected)
    np.testing.assert_array_equal(torch.from_numpy(x).bfloat16().float().numpy(), expected)
    gpu_bits = precision._bf16_bits(x)  # the GPU's path (CuPy has no bfloat16), run here with numpy
    np.testing.assert_array_equal(precision.load(gpu_bits), expected)
    assert np.isnan(precision.load(precision._bf16_bits(np.array([np.nan], np.float32))))[0]
    assert precision.store(x).dtype.itemsize == 2  # the cache format: half the bytes


@pytest.mark.parametrize("K", [64, 384, 1536])
def test_one_product_is_within_the_derived_error_bound(bf16, K):
    """Eq. (2) of mnn.precision: |D_hat - D| <= ((2u + u^2)(1 + g_K) + g_K) sum|Q||P| + u |D|."""
    rng = np.random.default_rng(K)
    q, p = rng.standard_normal((32, K)).astype(np.float32), rng.standard_normal((K, 48)).astype(np.float32)
    exact = q.astype(np.float64) @ p.astype(np.float64)
    got = precision.matmul(q, p)
    u, u32 = 2.0**-8, 2.0**-24
    gamma = K * u32 / (1 - K * u32)
    bound = ((2 * u + u * u) * (1 + gamma) + gamma) * (np.abs(q) @ np.abs(p)) + u * np.abs(exact)
    assert np.all(np.abs(got - exact) <= bound)
    assert np.abs(got - exact).max() > 0  # the rounding is real


def test_linear_matches_torch_autocast_bf16_forward_and_backward(bf16):
    rng = np.random.default_rng(2)
    layer = Linear(96, 40, rng=rng)
    x = rng.standard_normal((24, 96)).astype(np.float32)
    dy = rng.standard_normal((24, 40)).astype(np.float32)
    y = layer.forward(x)
    assert layer.cache.dtype.itemsize == 2  # the input kept for backward in bf16
    dx = layer.backward(dy)
    ref = torch.nn.Linear(96, 40)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(layer.params["weight"]))
        ref.bias.copy_(torch.from_numpy(layer.params["bias"]))
    xt = torch.from_numpy(x).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yt = ref(xt)
    assert yt.dtype == torch.bfloat16
    yt.backward(torch.from_numpy(dy).bfloat16())
    # Both round the same float32 sums to bf16; only the order of the sums differs: at most one bf16 ulp apart.
    for ours, theirs in [(y, yt), (dx, xt.grad), (layer.grads["weight"], ref.weight.grad),
                         (layer.grads["bias"], ref.bias.grad)]:
        theirs = theirs.detach().float().numpy()
        np.testing.assert_allclose(ours, theirs, rtol=BF16_ULP, atol=1e-6)
        assert rel(ours, theirs) < 2e-3


def test_matrix_product_matches_torch_autocast_bf16(bf16):
    rng = np.random.default_rng(3)
    q, p = rng.standard_normal((2, 8, 32)).astype(np.float32), rng.standard_normal((2, 32, 16)).astype(np.float32)
    dd = rng.standard_normal((2, 8, 16)).astype(np.float32)
    layer = MatrixProduct()
    d = layer.forward(q, p)
    dq, dp = layer.backward(dd)
    qt, pt = torch.from_numpy(q).requires_grad_(), torch.from_numpy(p).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dt = qt @ pt
    dt.backward(torch.from_numpy(dd).bfloat16())
    for ours, theirs in [(d, dt), (dq, qt.grad), (dp, pt.grad)]:
        np.testing.assert_allclose(ours, theirs.detach().float().numpy(), rtol=BF16_ULP, atol=1e-6)


def test_gpt_logits_loss_and_gradients_match_torch_autocast_bf16(bf16):
    """Stated tolerances: the whole model differs from autocast by where the non-product ops round (autocast keeps
    GELU's output in bf16, mnn in float32) and by the order of the float32 sums: logits within 5e-3 relative,
    the loss within 1e-3, every gradient within 1.5e-2 relative (measured here 1.2e-3, 3.5e-5 and 3.2e-3; on
    the CPU recipe's 4 x 128 GPT at T 64: 4.0e-3, 2.7e-5 and 5.9e-3)."""
    config = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config, seed=0)
    rng = np.random.default_rng(4)
    idx, targets = rng.integers(0, 65, (4, 16)), rng.integers(0, 65, (4, 16))
    loss_fn = CrossEntropyLoss()
    logits = model.forward(idx)
    loss = float(loss_fn.forward(logits, targets))
    model.backward(loss_fn.backward())
    reference = torch_copy(model, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_t = reference(torch.from_numpy(idx))
    loss_t = torch.nn.functional.cross_entropy(logits_t.float().view(-1, 65), torch.from_numpy(targets).view(-1))
    loss_t.backward()
    assert rel(logits, logits_t.float()) < 5e-3
    assert abs(loss - loss_t.item()) < 1e-3
    torch_grads = dict(reference.named_parameters())
    errors = {name: rel(grad, torch_grads[name].grad) for name, grad in model.named_grads() if name in torch_grads}
    assert errors and max(errors.values()) < 1.5e-2, errors
    # and bf16 is not float32: the same model in float32 differs from this run
    precision.set_compute_dtype("float32")
    assert rel(model.forward(idx), logits) > 1e-4


def test_a_skipped_step_still_zeroes_the_gradients_when_asked():
    from mnn.optim import SGD  # noqa: PLC0415

    layer = Linear(2, 2, rng=np.random.default_rng(0))
    scaler = precision.GradScaler(scale=8.0)
    optimizer = scaler.guard(SGD(layer, lr=0.1))
    before = layer.params["weight"].copy()
    layer.grads["weight"][...] = np.inf
    scaler.update(finite=False)
    optimizer.step(zero_grad=True)  # skipped, as the loop steps: the gradients are zeroed all the same
    np.testing.assert_array_equal(layer.params["weight"], before)
    assert not layer.grads["weight"].any()


def test_grad_scaler_skips_the_step_and_halves_the_scale_on_overflow_and_grows_after_good_steps():
    from mnn.optim import SGD  # noqa: PLC0415

    layer = Linear(2, 2, rng=np.random.default_rng(0))
    scaler = precision.GradScaler(scale=8.0, growth_interval=2)
    optimizer = scaler.guard(SGD(layer, lr=0.1))
    before = layer.params["weight"].copy()
    layer.grads["weight"][...] = np.inf
    scaler.update(finite=False)
    optimizer.step()
    np.testing.assert_array_equal(layer.params["weight"], before)  # skipped
    assert scaler.scale == 4.0 and scaler.skipped == 1
    layer.grads["weight"][...] = 8.0
    scaler.unscale([layer.grads["weight"]])
    np.testing.assert_array_equal(layer.grads["weight"], 2.0)
    for _ in range(2):
        scaler.update(finite=True)
    optimizer.step()
    assert not np.array_equal(layer.params["weight"], before) and scaler.scale == 8.0
    loss = precision.ScaledLoss(CrossEntropyLoss(), scaler)
    loss.forward(xp.zeros((2, 3), dtype=xp.float32), np.array([0, 1]))
    np.testing.assert_allclose(loss.backward(1.0)[0, 0], (1 / 3 - 1) / 2 * 8.0)
    assert copy.deepcopy(loss).scaler is scaler  # replicas share it


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(ValueError, match="expected one of float32, bf16, fp16"):
        precision.set_compute_dtype("int8")


SHAKESPEARE = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data/tinyshakespeare.txt is not beside the checkout")
def test_short_bf16_and_fp16_gpt_runs_track_float32(tmp_path):
    """300 steps of a 2 x 64 GPT: the validation loss in bf16 and in fp16 (loss-scaled) within 0.05 of float32's
    (measured: 2.4344 float32, 2.4341 bf16, 2.4342 fp16)."""
    from mnn.train.language_model import GPTTrainConfig, train_gpt  # noqa: PLC0415

    vals = {}
    for dtype in ("float32", "bf16", "fp16"):
        config = GPTTrainConfig(data=str(SHAKESPEARE), out=str(tmp_path / dtype), block_size=32, n_layer=2, n_head=2,
                                n_embd=64, batch_size=16, max_iters=300, learning_rate=3e-3, min_lr=3e-4,
                                warmup_iters=30, eval_interval=150, eval_iters=20, seed=0, dtype=dtype)
        try:
            vals[dtype] = train_gpt(config)["val"]
        finally:
            precision.set_compute_dtype("float32")
    assert vals["float32"] < 2.6  # it learned (uniform: ln 65 = 4.17)
    assert abs(vals["bf16"] - vals["float32"]) < 0.05 and abs(vals["fp16"] - vals["float32"]) < 0.05, vals
    assert vals["bf16"] != vals["float32"]  # the products did run in bf16


def test_bf16_on_the_strict_device_equals_bf16_on_the_cpu():
    """The GPU's bf16 path (bit rounding, uint16 caches, no ml_dtypes) with no host crossing, bit for bit."""
    from mnn import backend, jit  # noqa: PLC0415

    config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16)
    rng = np.random.default_rng(5)
    idx, targets = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))

    def run(device):
        backend.use(device)
        model, loss_fn = GPT(config, seed=0), CrossEntropyLoss()
        loss = loss_fn.forward(model.forward(backend.asarray(idx)), backend.asarray(targets))
        model.backward(loss_fn.backward())
        return float(loss), {name: backend.to_numpy(grad) for name, grad in model.named_grads()}

    previous = jit.set_enabled(False)
    precision.set_compute_dtype("bf16")
    try:
        host = run("cpu")
        device = run("strict")
    finally:
        backend.use("cpu")
        jit.set_enabled(previous)
        precision.set_compute_dtype("float32")
    assert host[0] == device[0]
    for name in host[1]:
        np.testing.assert_array_equal(device[1][name], host[1][name], err_msg=name)
