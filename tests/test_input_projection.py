"""The embedding folded into layer 0's input projection (mnn.layers.input_projection): finite differences in float64,
and the folded char-rnn equal to the unfolded one, output and gradient, on the numpy and the compiled loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_transformer import rel

import mnn
from mnn import jit
from mnn.backend import default_dtype, on_cpu, set_default_dtype, to_numpy, xp
from mnn.errors import InputError
from mnn.layers import LSTM, Embedding
from mnn.layers import input_projection as projection
from mnn.layers.input_projection import TableLookup
from mnn.models import CharRNN

CELLS = ["lstm", "gru", "rnn"]


@pytest.fixture
def projections(monkeypatch):
    """Counts the folded projections (``TableLookup.project`` calls) while a test runs."""
    calls = []
    original = projection.TableLookup.project

    def counted(self, w_ih, bias):
        calls.append(self.shape)
        return original(self, w_ih, bias)

    monkeypatch.setattr(projection.TableLookup, "project", counted)
    return calls


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_of_the_folded_char_rnn(cell, compute_path, projections):
    """Every parameter (the table, each layer's weights and biases, the head) by central differences, with a
    random upstream gradient; the ids repeat and leave one row of the table unread (its gradient stays 0)."""
    previous = default_dtype()
    set_default_dtype(np.float64)
    try:
        model = CharRNN(7, 3, 4, 2, cell=cell, seed=0)
    finally:
        set_default_dtype(previous)
    model.fold_embedding = True  # also on the numpy path (where it would not pay)
    ids = np.random.default_rng(1).integers(0, 6, (3, 5))  # 15 positions > 7 rows; id 6 unread
    errors = mnn.gradcheck(model, (ids,), seed=2)
    assert projections, "the char-rnn did not fold its embedding"
    assert set(errors) == {name for name, _ in model.named_parameters()}
    assert max(errors.values()) <= 1e-7, errors
    assert not model.wte.grads["weight"][6].any()


def train_twice(cell, ids, fold: bool, compiled: bool, state=None):
    """Two forward/backward passes (gradients accumulate) with a random upstream gradient; outputs and grads."""
    previous = jit.set_enabled(compiled)
    try:
        model = CharRNN(65, 16, 64, 2, cell=cell, dropout=0.1, seed=5)
        model.fold_embedding = fold
        results = []
        for seed in (6, 7):
            logits, final = model.step(ids, state)
            dlogits = np.random.default_rng(seed).standard_normal(logits.shape).astype(np.float32)
            model.backward(dlogits)
            results += [logits, *(final if isinstance(final, tuple) else (final,))]
        assert all(module.cache is None for _, module in model.named_modules())  # released after backward
    finally:
        jit.set_enabled(previous)
    return results + [grad for _, grad in model.named_grads()]


@pytest.mark.parametrize("cell", CELLS)
def test_the_folded_char_rnn_equals_the_unfolded_one_in_float32(cell, projections):
    """Logits, final states and every gradient after two accumulated steps: folded (numpy loops and compiled)
    against unfolded (both), at most 1e-5 relative; with a given initial state too."""
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 65, (5, 20))  # 100 positions > 65 rows
    states = [None, tuple(rng.standard_normal((2, 5, 64)).astype(np.float32) for _ in range(2 if cell == "lstm"
                                                                                            else 1))]
    for state in states:
        state = state if state is None or len(state) == 2 else state[0]
        reference = train_twice(cell, ids, fold=False, compiled=False, state=state)
        for fold, compiled in ((True, False), (True, True), (False, True)):
            for mine, expected in zip(train_twice(cell, ids, fold, compiled, state), reference, strict=True):
                assert mine.dtype == np.float32
                assert rel(mine, expected) <= 1e-5, (fold, compiled)
    assert len(projections) == 2 * 2 * 2 * 1  # two steps, two state cases, two folded runs, layer 0 only


def test_the_folded_lstm_takes_the_compiled_loops(monkeypatch):
    """With numba and OpenBLAS's sgemm, the folded layer 0 runs the compiled loops (they sum the rows per id)."""
    from mnn.layers import lstm_compiled

    if not lstm_compiled.can_run(np.zeros(1, np.float32)):
        pytest.skip("numba or OpenBLAS's ILP64 sgemm missing: the numpy loops run")
    seen = []
    original = lstm_compiled.backward_loop

    def spy(*args):
        seen.append(type(args[9]).__name__)  # x: the layer's input
        return original(*args)

    monkeypatch.setattr(lstm_compiled, "backward_loop", spy)
    previous = jit.set_enabled(True)
    try:
        model = CharRNN(65, 8, 32, 2, seed=1)
        logits = model.forward(np.zeros((4, 30), int))
        model.backward(np.ones_like(logits) / 100)
    finally:
        jit.set_enabled(previous)
    assert seen == ["ndarray", "TableLookup"]  # layer 1 reads rows, layer 0 the ids


def test_the_folded_char_rnn_matches_torch_and_its_state_dict_loads_strictly():
    from benchmarks import torch_models

    model = CharRNN(65, 16, 32, 2, seed=0)
    model.fold_embedding = True
    twin = torch_models.CharRNN(65, 16, 32, 2)
    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}, strict=True)
    ids = np.random.default_rng(8).integers(0, 65, (4, 30))
    logits = model.forward(ids)
    dlogits = np.random.default_rng(9).standard_normal(logits.shape).astype(np.float32)
    model.backward(dlogits)
    expected = twin(torch.from_numpy(ids))
    expected.backward(torch.from_numpy(dlogits))
    assert rel(logits, expected) <= 1e-5
    grads = dict(model.named_grads())
    for name, parameter in twin.named_parameters():
        assert rel(grads[name], parameter.grad) <= 1e-5, name


def test_no_fold_where_it_does_not_pay(projections):
    """By default the char-rnn folds only with more positions than rows (sampling feeds one character at a
    time) and with the compiled kernels (the numpy path sums the rows per id more slowly than it saves)."""
    model = CharRNN(65, 8, 16, 1, seed=0)
    previous = jit.set_enabled(True)
    try:
        if not jit.enabled():
            pytest.skip("no compiled loops on this device (as on a GPU): nothing folds by default")
        model.generate(np.zeros((2, 40), int), 3, rng=0)  # the prompt folds (80 > 65), then 3 steps of 2 rows
        assert projections == [(40, 2, 8)]  # time-major inside the stack
        jit.set_enabled(False)
        model.forward(np.zeros((2, 40), int))
        assert len(projections) == 1
    finally:
        jit.set_enabled(previous)


def test_a_table_lookup_is_refused_by_a_bidirectional_stack_and_checks_its_ids():
    embedding = Embedding(5, 3, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="one direction"):
        LSTM(3, 4, bidirectional=True).forward(TableLookup(xp.zeros((2, 6), dtype=int), embedding))
    if on_cpu():  # on a device the check rides with the next read-back (mnn.backend.defer_check)
        with pytest.raises(InputError, match="id 5 out of range"):
            TableLookup(xp.full((2, 6), 5), embedding)


def test_a_standalone_stack_folds_time_major_and_batch_first_alike():
    """The layer given a TableLookup equals the layer given the looked-up rows; the table's gradient is the
    embedding's scatter of dx, and backward returns None for the input."""
    rng = np.random.default_rng(10)
    ids = rng.integers(0, 5, (6, 3))
    for batch_first in (False, True):
        results = []
        for fold in (True, False):
            embedding = Embedding(5, 3, rng=np.random.default_rng(0), dtype=np.float64)
            lstm = LSTM(3, 4, 2, batch_first=batch_first, rng=np.random.default_rng(1), dtype=np.float64)
            x = TableLookup(xp.asarray(ids), embedding) if fold else embedding.forward(ids)
            output, _ = lstm.forward(x)
            dx, _ = lstm.backward(np.ones_like(output))
            if fold:
                assert dx is None
            else:
                embedding.backward(dx)
            results.append([to_numpy(a) for a in (output, embedding.grads["weight"], *lstm.grads.values())])
        for mine, expected in zip(*results, strict=True):
            np.testing.assert_allclose(mine, expected, rtol=1e-12, atol=1e-12)
