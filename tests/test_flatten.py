"""Module.flatten_parameters: one buffer for the parameters and one for the gradients, the same training to the bit."""

import numpy as np
import pytest

from mnn import replica_process, threads
from mnn.backend import xp
from mnn.layers import Linear
from mnn.losses import CrossEntropyLoss
from mnn.models.gpt import GPT, GPTConfig
from mnn.optim import SGD, AdamW, clip_grad_norm, param_groups
from mnn.parallel import DataParallel

pytestmark = pytest.mark.skipif(xp._module is not np, reason="numpy arrays only (flags, addresses)")

CONFIG = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.1, bias=True)


def tokens(rows, seed):
    rng = np.random.default_rng(seed)
    shape = (rows, CONFIG.block_size)
    return rng.integers(0, CONFIG.vocab_size, shape), rng.integers(0, CONFIG.vocab_size, shape)


def test_values_kept_tied_weights_tied_and_each_group_one_run():
    model = GPT(CONFIG, seed=1)
    before = {name: value.copy() for name, value in model.state_dict().items()}
    model.flatten_parameters()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[name], after[name]) for name in before)
    assert model.lm_head.params["weight"] is model.transformer.wte.params["weight"]
    assert model.lm_head.grads["weight"] is model.transformer.wte.grads["weight"]
    params = [param for _, param in model.named_parameters()]
    grads = [grad for _, grad in model.named_grads()]
    assert len(threads.runs([params, grads], piece=10**9)) == 1  # everything end to end, in both buffers
    for group in param_groups(model, 0.1):  # matrices, then vectors: each group a run of its own
        columns = [[param for _, param, _ in group["params"]], [grad for _, _, grad in group["params"]]]
        assert len(threads.runs(columns, piece=10**9)) == 1


def test_an_optimizer_built_before_fails_in_one_line():
    model = GPT(CONFIG, seed=1)
    optimizer = AdamW(model, lr=1e-2)
    model.flatten_parameters()
    with pytest.raises(ValueError, match="read-only.*flatten_parameters.*build it after"):
        optimizer.step()


def test_mixed_dtypes_are_refused():
    layer = Linear(3, 2)
    layer.add_parameter("extra", np.zeros(4, np.float64))
    with pytest.raises(ValueError, match="one dtype"):
        layer.flatten_parameters()


def train_gpt(flat, processes, steps=3):
    model = GPT(CONFIG, seed=5)
    if flat:
        model.flatten_parameters()
    parallel = DataParallel(model, CrossEntropyLoss(), 2, processes=processes)
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-2)
    grads = [grad for _, grad in model.named_grads()]
    try:
        losses = []
        for step in range(steps):
            optimizer.zero_grad()
            losses.append(parallel.forward_backward(*tokens(7, step)))
            clip_grad_norm(grads, 0.05)  # small enough to scale every step
            optimizer.step()
        if flat and processes:  # the replica's arrays lie as the model's do: the sum is a run or two
            assert len(threads.runs([parallel._grads[0], parallel._grads[1]])) <= 2
        return losses, {name: value.copy() for name, value in model.state_dict().items()}, optimizer.state_dict()
    finally:
        parallel.close()


@pytest.mark.parametrize("processes", [False, pytest.param(True, marks=pytest.mark.skipif(
    not replica_process.available(), reason="no fork here"))])
def test_flattened_training_gives_the_same_bits(processes):
    """AdamW with weight-decay groups, clipping and two replicas: flattening changes where arrays lie, no number."""
    plain, flat = train_gpt(False, processes), train_gpt(True, processes)
    assert plain[0] == flat[0]
    for one, two in [(plain[1], flat[1]), (plain[2], flat[2])]:
        assert one.keys() == two.keys()
        for name in one:
            assert np.array_equal(one[name], two[name]), name


def test_flattened_sgd_with_momentum_gives_the_same_bits(compute_path):
    results = []
    for flat in (False, True):
        layer = Linear(300, 200, rng=np.random.default_rng(0))
        if flat:
            layer.flatten_parameters()
        optimizer = SGD(layer, lr=0.1, momentum=0.9, weight_decay=1e-3)
        x = np.random.default_rng(1).standard_normal((8, 300)).astype(np.float32)
        for _ in range(3):
            optimizer.zero_grad()
            layer.backward(layer.forward(x) - 1.0)
            optimizer.step()
        results.append({name: value.copy() for name, value in layer.state_dict().items()})
    for name in results[0]:
        assert np.array_equal(results[0][name], results[1][name]), name


@pytest.mark.skipif(not replica_process.available(), reason="no fork here")
def test_replica_processes_read_flattened_weights_in_place_and_refuse_a_replaced_one():
    model = GPT(CONFIG, seed=5)
    model.flatten_parameters()
    parallel = DataParallel(model, CrossEntropyLoss(), 2, processes=True)
    try:
        worker = parallel._workers[1]
        assert not any(kind == "params" for _, _, kind, _ in worker._copies)  # nothing copied before a pass
        assert parallel.models[1].transformer.wte.params["weight"] is model.transformer.wte.params["weight"]
        for step in range(2):  # the second pass runs in the child
            parallel.forward_backward(*tokens(4, step))
        model.flatten_parameters()  # the replica would read arrays the model no longer uses
        with pytest.raises(RuntimeError, match="replaced after its replica processes were built"):
            parallel.forward_backward(*tokens(4, 3))
    finally:
        parallel.close()


def test_the_parent_polls_for_answers_only_with_a_core_per_process(monkeypatch):
    if not replica_process.available():
        pytest.skip("no fork here")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    spins = []
    for replicas in (2, 3):
        parallel = DataParallel(GPT(CONFIG, seed=5), CrossEntropyLoss(), replicas, processes=True)
        spins.append({worker.spin for worker in parallel._workers.values()})
        parallel.close()
    assert spins == [{replica_process.SPIN_SECONDS}, {0.0}]


def test_replica_threads_refuse_weights_replaced_after_them():
    model = GPT(CONFIG, seed=5)
    parallel = DataParallel(model, CrossEntropyLoss(), 2, processes=False)
    try:
        parallel.forward_backward(*tokens(4, 0))
        model.flatten_parameters()
        with pytest.raises(RuntimeError, match="replaced after its replicas were built"):
            parallel.forward_backward(*tokens(4, 1))
    finally:
        parallel.close()
