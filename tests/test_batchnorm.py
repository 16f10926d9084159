"""BatchNorm1d/2d and module buffers: finite differences, PyTorch parity (outputs, gradients, running statistics),
state dicts both ways, checkpoints and DataParallel with buffers, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_transformer import DTYPES, perturb_params, randn, rel

import mnn
from mnn.errors import CheckpointError, ShapeError
from mnn.io.checkpoint import load_checkpoint, save_checkpoint
from mnn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
)
from mnn.losses import CrossEntropyLoss
from mnn.module import Sequential
from mnn.optim import AdamW
from mnn.parallel import DataParallel

CASES = [(BatchNorm1d, (6, 3)), (BatchNorm1d, (4, 3, 5)), (BatchNorm2d, (3, 3, 4, 5))]


def build(cls, dtype, rng, **options):
    layer = cls(3, dtype=dtype, **options)
    perturb_params(layer, rng)  # random gamma and beta: with beta = 0, y.sum() would be identically 0
    return layer


@pytest.mark.parametrize("cls, shape", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradcheck(cls, shape, training, compute_path):
    rng = np.random.default_rng(0)
    layer = build(cls, np.float64, rng)
    layer.buffers["running_mean"][...] = randn(rng, 3)
    layer.buffers["running_var"][...] = rng.uniform(0.5, 2.0, 3)
    layer.train(training)
    before = {k: v.copy() for k, v in layer.buffers.items()}
    errors = mnn.gradcheck(layer, randn(rng, shape))
    assert set(errors) == {"input0", "weight", "bias"} and max(errors.values()) <= 1e-7, errors
    if not training:
        assert all(np.array_equal(before[k], v) for k, v in layer.buffers.items())


@pytest.mark.parametrize("np_dtype, torch_dtype, tol", DTYPES)
@pytest.mark.parametrize("cls, shape", CASES)
@pytest.mark.parametrize("momentum, affine, track", [(0.1, True, True), (None, True, True), (0.3, False, True),
                                                     (0.1, True, False)])
def test_batchnorm_matches_pytorch_over_steps_and_in_evaluation(cls, shape, np_dtype, torch_dtype, tol,
                                                                momentum, affine, track, compute_path):
    rng = np.random.default_rng(1)
    layer = build(cls, np_dtype, rng, momentum=momentum, affine=affine, track_running_stats=track)
    ref = getattr(torch.nn, cls.__name__)(3, momentum=momentum, affine=affine, track_running_stats=track,
                                          dtype=torch_dtype)
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layer.state_dict().items()})
    for step in range(4):
        x = randn(rng, shape, np_dtype, scale=2.0) + 1.5
        if step % 2 and x.ndim == 4:  # Conv2d's channels-last output
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        layer.zero_grad()
        ref.zero_grad()
        y = layer.forward(x)
        dy = randn(rng, y.shape, np_dtype)
        dx = layer.backward(dy)
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt)
        yt.backward(torch.from_numpy(dy))
        assert y.dtype == np_dtype and dx.dtype == np_dtype
        assert rel(y, yt) <= tol and rel(dx, xt.grad) <= tol
        for name, param in ref.named_parameters():
            assert rel(layer.grads[name], param.grad) <= tol, name
    for name, buffer in ref.named_buffers():
        assert rel(layer.buffers[name], buffer) <= tol, name
    if track:
        assert layer.buffers["num_batches_tracked"].dtype == np.int64 and int(layer.buffers["num_batches_tracked"]) == 4
    layer.eval()
    ref.eval()
    x = randn(rng, shape, np_dtype)
    y = layer.forward(x)
    dy = randn(rng, y.shape, np_dtype)
    dx = layer.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = ref(xt)
    yt.backward(torch.from_numpy(dy))
    assert rel(y, yt) <= tol and rel(dx, xt.grad) <= tol


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm2d_gradcheck_on_channels_last_memory(training, compute_path):
    """Behind a Conv2d (channels-last output): the rows are a view, the gradient comes back channels-last."""
    rng = np.random.default_rng(2)
    conv = Conv2d(3, 3, 1, bias=False, rng=rng, dtype=np.float64)
    layer = build(BatchNorm2d, np.float64, rng)
    layer.buffers["running_var"][...] = rng.uniform(0.5, 2.0, 3)
    model = Sequential(conv, layer)
    model.train(training)
    errors = mnn.gradcheck(model, randn(rng, (3, 3, 4, 5)) + 2.0)
    assert max(errors.values()) <= 1e-7, errors
    y = layer.forward(conv.forward(randn(rng, (2, 3, 4, 5))))
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous
    assert layer.backward(y).transpose(0, 2, 3, 1).flags.c_contiguous


def test_batchnorm_one_pass_moments_keep_a_large_mean_exact(compute_path):
    """A mean 10^6 times the spread: E[x^2] - E[x]^2 would cancel to noise (the compiled path sums in one pass)."""
    rng = np.random.default_rng(4)
    x = 1e4 + 1e-2 * randn(rng, (64, 3, 6, 6))
    ref = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    layer = BatchNorm2d(3, dtype=np.float64)
    assert rel(layer.forward(x), ref(torch.from_numpy(x))) <= 1e-7
    assert rel(layer.buffers["running_var"], ref.running_var) <= 1e-7


def test_buffers_are_in_the_state_dict_not_among_parameters_and_load_strictly():
    model = Sequential(Conv2d(1, 4, 3, rng=np.random.default_rng(0)), BatchNorm2d(4), ReLU())
    names = [name for name, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [name for name, _ in model.named_grads()] == names
    assert [name for name, _ in model.named_buffers()] == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    assert list(model.state_dict()) == list(ref.state_dict())
    ref.train()
    ref(torch.randn(8, 1, 6, 6))  # moves its running statistics
    model.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    assert int(model.state_dict()["1.num_batches_tracked"]) == 1
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}, strict=True)
    state = {k: v.numpy() for k, v in ref.state_dict().items() if k != "1.running_var"}
    with pytest.raises(CheckpointError, match="missing 1.running_var"):
        model.load_state_dict(state)
    model.eval()
    ref.eval()
    x = randn(np.random.default_rng(1), (2, 1, 6, 6), np.float32)
    assert rel(model.forward(x), ref(torch.from_numpy(x))) <= 1e-5


def small_cnn():
    model = Sequential(Conv2d(1, 4, 3, padding=1, rng=np.random.default_rng(0)), BatchNorm2d(4), ReLU(),
                       MaxPool2d(2), Flatten(), Linear(4 * 3 * 3, 5, rng=np.random.default_rng(1)),
                       BatchNorm1d(5))
    model.config = {"kind": "test"}
    return model


def test_checkpoint_saves_and_restores_buffers_and_the_optimizer_never_touches_them(tmp_path):
    rng = np.random.default_rng(2)
    model, loss_fn = small_cnn(), CrossEntropyLoss()
    optimizer = AdamW(model, lr=1e-2, weight_decay=0.5)
    for _ in range(2):
        model.zero_grad()
        x, labels = randn(rng, (8, 1, 6, 6), np.float32), rng.integers(0, 5, 8)
        loss_fn.forward(model.forward(x), labels)
        model.backward(loss_fn.backward())
        optimizer.step()
    assert int(model.state_dict()["1.num_batches_tracked"]) == 2
    path = save_checkpoint(tmp_path / "c.safetensors", model, optimizer, {}, {}, 2, {})
    saved = {k: np.array(v) for k, v in model.state_dict().items()}
    fresh = small_cnn()
    load_checkpoint(path, fresh, AdamW(fresh, lr=1e-2), {})
    for name, value in fresh.state_dict().items():
        assert value.dtype == saved[name].dtype and np.array_equal(value, saved[name]), name


def test_data_parallel_runs_batchnorm_and_keeps_replica_0s_running_statistics():
    rng = np.random.default_rng(3)
    model, loss_fn = small_cnn(), CrossEntropyLoss()
    single = small_cnn()
    parallel = DataParallel(model, loss_fn, replicas=2)
    try:
        x, labels = randn(rng, (8, 1, 6, 6), np.float32), rng.integers(0, 5, 8)
        parallel.forward_backward(x, labels)
        loss_fn.forward(single.forward(x[:4]), labels[:4])  # replica 0's shard
        for name, value in single.named_buffers():
            np.testing.assert_allclose(dict(model.named_buffers())[name], value, rtol=1e-6)
        parallel.forward_backward(x, labels)
        replica = parallel.models[1]
        parallel.train(False)
        parallel.evaluate(x, labels)
        for (_, ours), (_, theirs) in zip(model.named_buffers(), replica.named_buffers()):
            np.testing.assert_array_equal(ours, theirs)  # broadcast before every pass
    finally:
        parallel.close()


@pytest.mark.parametrize("layer, shape, message", [
    (BatchNorm2d(3), (2, 3, 4), r"BatchNorm2d\(3, .*expected a 4-D input \(N, 3, \.\.\.\), got shape \(2, 3, 4\)"),
    (BatchNorm2d(3), (2, 4, 5, 5), r"expected 3 channels in dim 1, got shape \(2, 4, 5, 5\)"),
    (BatchNorm1d(3), (2, 3, 4, 5), r"BatchNorm1d\(3, .*expected a 2-D or 3-D input"),
    (BatchNorm1d(3), (1, 3), "expected more than 1 value per channel when training"),
])
def test_batchnorm_refuses_bad_input(layer, shape, message):
    with pytest.raises(ShapeError, match=message):
        layer.forward(np.zeros(shape, np.float32))
