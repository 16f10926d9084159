"""Data parallelism in threads computes what one model on the whole batch computes (Eq. 1 of DataParallel)."""

import numpy as np
import pytest

from mnn.backend import set_default_dtype
from mnn.models.gpt import GPT, GPTConfig
from mnn.losses import CrossEntropyLoss
from mnn.models import MLP
from mnn.parallel import DataParallel, share_weights

CONFIG = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8, dropout=0.0, bias=True)


def gpt(dropout=0.0):
    return GPT(GPTConfig(**{**CONFIG.__dict__, "dropout": dropout}), seed=3, dtype=np.float64)


def tokens(rows, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CONFIG.vocab_size, (rows, CONFIG.block_size)), rng.integers(0, CONFIG.vocab_size,
                                                                                          (rows, CONFIG.block_size))


def plain_loss_and_grads(model, x, y):
    loss_fn = CrossEntropyLoss()
    model.zero_grad()
    loss = float(loss_fn.forward(model.forward(x), y))
    model.backward(loss_fn.backward())
    return loss, {name: grad.copy() for name, grad in model.named_grads()}


@pytest.mark.parametrize("rows, replicas", [(6, 2), (5, 2), (7, 3), (2, 3)])  # even, uneven, empty shard
def test_gradients_and_loss_equal_the_whole_batch(rows, replicas):
    x, y = tokens(rows)
    loss, grads = plain_loss_and_grads(gpt(), x, y)
    model = gpt()
    parallel = DataParallel(model, CrossEntropyLoss(), replicas)
    model.zero_grad()
    assert parallel.forward_backward(x, y) == pytest.approx(loss, rel=1e-13)
    for name, grad in model.named_grads():
        np.testing.assert_allclose(grad, grads[name], rtol=1e-11, atol=1e-14, err_msg=name)
    assert parallel.evaluate(x, y) == pytest.approx(loss, rel=1e-13)
    parallel.close()


def test_gradients_accumulate_into_the_models_as_without_replicas():
    x, y = tokens(4)
    model = gpt()
    parallel = DataParallel(model, CrossEntropyLoss(), 2)
    model.zero_grad()
    parallel.forward_backward(x, y)
    once = {name: grad.copy() for name, grad in model.named_grads()}
    parallel.forward_backward(x, y)  # no zero_grad in between: the model's gradients double
    for name, grad in model.named_grads():
        np.testing.assert_allclose(grad, 2 * once[name], rtol=1e-12, err_msg=name)


def test_results_do_not_depend_on_thread_timing():
    x, y = tokens(8, seed=1)
    runs = []
    for _ in range(3):
        model = gpt()
        parallel = DataParallel(model, CrossEntropyLoss(), 2)
        model.zero_grad()
        parallel.forward_backward(x, y)
        runs.append(np.concatenate([grad.ravel() for _, grad in model.named_grads()]))
    assert all(np.array_equal(runs[0], run) for run in runs[1:])  # bit for bit


def test_replicas_share_weights_not_gradients_and_draw_their_own_dropout():
    model = gpt(dropout=0.5)
    replica = share_weights(model)
    for (name, param), (_, twin) in zip(model.named_parameters(), replica.named_parameters()):
        assert twin is param, name
    for (name, grad), (_, twin) in zip(model.named_grads(), replica.named_grads()):
        assert not np.shares_memory(grad, twin), name
    assert replica.lm_head.grads["weight"] is replica.transformer.wte.grads["weight"]  # still tied
    x, _ = tokens(3)
    assert not np.array_equal(model.forward(x), replica.forward(x))  # independent dropout masks
    model.eval()
    replica.eval()
    np.testing.assert_array_equal(model.forward(x), replica.forward(x))  # same weights


def test_mlp_and_bad_arguments():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    set_default_dtype(np.float64)
    try:
        model = MLP(6, (5,), 3, seed=0)
    finally:
        set_default_dtype(np.float32)
    loss, grads = plain_loss_and_grads(model, x, y)
    parallel = DataParallel(model, CrossEntropyLoss(), 2)
    model.zero_grad()
    assert parallel.forward_backward(x, y) == pytest.approx(loss, rel=1e-13)
    for name, grad in model.named_grads():
        np.testing.assert_allclose(grad, grads[name], rtol=1e-11, err_msg=name)
    with pytest.raises(ValueError, match="9 inputs but 8 targets"):
        parallel.forward_backward(x, y[:8])
    with pytest.raises(ValueError, match="replicas must be a positive integer, got 0"):
        DataParallel(model, CrossEntropyLoss(), 0)
