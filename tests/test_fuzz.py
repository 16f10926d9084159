"""Property tests over layer shapes and dtypes, and fuzzing of the two file readers (IDX and checkpoints):
every outcome is a correct result or mnn's own error type, never another exception or a hang."""

import gzip
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnn.io.checkpoint import load_checkpoint, model_generators, save_checkpoint
from mnn.data import read_idx, write_idx
from mnn.errors import MnnError
from mnn.gradcheck import gradcheck
from mnn.io import load_model, parse_safetensors
from mnn.layers import Dropout, Linear, Log, LogSoftmax, MatrixProduct, ReLU, Sigmoid, Softmax, Tanh
from mnn.models import MLP
from mnn.optim import AdamW

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORK = Path(tempfile.mkdtemp(prefix="mnn-fuzz-"))  # hypothesis re-runs a test body; tmp_path is per test


@contextmanager
def time_limit(seconds: float):
    """Fail a case that takes longer than ``seconds`` (a hang) instead of blocking the suite."""
    def expire(signum, frame):
        raise TimeoutError(f"case took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- layers: gradcheck and shapes over random shapes and both dtypes -----------------
shapes = st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)
dtypes = st.sampled_from([np.float32, np.float64])


def away_from_zero(rng, shape):
    """Normal values with no element within 0.05 of 0, so ReLU's kink is never inside a finite difference."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 0.05, 0.5 + np.abs(x), x)


def check_shapes(layer, inputs, dtype):
    """float32 in, float32 out; the gradient of each input has that input's shape and dtype."""
    inputs = tuple(np.asarray(x, dtype=dtype) for x in inputs)
    layer.params = {k: v.astype(dtype) for k, v in layer.params.items()}
    layer.grads = {k: np.zeros_like(v) for k, v in layer.params.items()}
    y = layer.forward(*inputs)
    assert y.dtype == dtype
    grads = layer.backward(np.ones_like(y))
    grads = grads if isinstance(grads, tuple) else (grads,)
    for x, g in zip(inputs, grads):
        assert g.shape == x.shape and g.dtype == dtype
    return y


@FAST
@given(lead=shapes, fan_in=st.integers(1, 4), fan_out=st.integers(1, 4), bias=st.booleans(), dtype=dtypes,
       seed=st.integers(0, 2**16))
def test_linear_over_shapes(lead, fan_in, fan_out, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    layer = Linear(fan_in, fan_out, bias=bias, rng=rng, dtype=np.float64)
    x = rng.standard_normal((*lead, fan_in))
    gradcheck(layer, (x,))
    assert check_shapes(layer, (x,), dtype).shape == (*lead, fan_out)


@FAST
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2**16),
       make=st.sampled_from([ReLU, Sigmoid, Tanh, Log, lambda: Softmax(axis=-1), lambda: LogSoftmax(axis=0)]))
def test_elementwise_and_softmax_layers_over_shapes(shape, dtype, seed, make):
    rng = np.random.default_rng(seed)
    layer = make()
    x = away_from_zero(rng, shape)
    if isinstance(layer, Log):
        x = np.abs(x) + 0.1
    gradcheck(layer, (x,))
    assert check_shapes(layer, (x,), dtype).shape == shape


@FAST
@given(shape=shapes, p=st.sampled_from([0.0, 0.25, 0.5]), dtype=dtypes, seed=st.integers(0, 2**16))
def test_dropout_over_shapes(shape, p, dtype, seed):
    layer = Dropout(p)
    reseed = lambda: setattr(layer, "rng", np.random.default_rng(seed))  # noqa: E731 - the same mask each time
    gradcheck(layer, (np.random.default_rng(seed).standard_normal(shape),), before_forward=reseed)
    reseed()
    assert check_shapes(layer, (np.ones(shape),), dtype).shape == shape


@FAST
@given(batch=st.lists(st.integers(1, 2), max_size=2).map(tuple), n=st.integers(1, 3), k=st.integers(1, 3),
       m=st.integers(1, 3), dtype=dtypes, seed=st.integers(0, 2**16))
def test_matrix_product_over_shapes(batch, n, k, m, dtype, seed):
    rng = np.random.default_rng(seed)
    q, p = rng.standard_normal((*batch, n, k)), rng.standard_normal((*batch, k, m))
    gradcheck(MatrixProduct(), (q, p))
    assert check_shapes(MatrixProduct(), (q, p), dtype).shape == (*batch, n, m)


# -- the IDX reader ---------------------------------------------------------------
def idx_outcome(data: bytes, name: str = "case.idx"):
    path = WORK / name
    path.write_bytes(data)
    with time_limit(5):
        try:
            return read_idx(path)
        except MnnError as error:
            return error


def real_idx(gz: bool) -> bytes:
    path = WORK / ("real.idx.gz" if gz else "real.idx")
    write_idx(path, np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4), gzip=gz)
    return path.read_bytes()


@FUZZ
@given(data=st.one_of(st.binary(max_size=80),
                      st.builds(lambda code, ndim, rest: bytes([0, 0, code, ndim]) + rest,
                                st.sampled_from([8, 9, 10, 11, 12, 13, 14, 255]), st.integers(0, 4),
                                st.binary(max_size=64))))
def test_idx_reader_on_random_bytes(data):
    outcome = idx_outcome(data)
    assert isinstance(outcome, (np.ndarray, MnnError))


def mutate(data: bytes, kind: str, position: int, value: int) -> bytes:
    position %= max(len(data), 1)
    if kind == "flip":
        out = bytearray(data)
        out[position] ^= 1 << (value % 8)
        return bytes(out)
    if kind == "truncate":
        return data[:position]
    if kind == "header":  # overwrite one of the first 64 bytes
        out = bytearray(data)
        out[position % min(64, len(data))] = value % 256
        return bytes(out)
    if kind == "append":
        return data + bytes([value % 256]) * (1 + value % 7)
    raise AssertionError(kind)


mutations = st.tuples(st.sampled_from(["flip", "truncate", "header", "append"]), st.integers(0, 2**20),
                      st.integers(0, 2**16))


@FUZZ
@given(gz=st.booleans(), mutation=mutations)
def test_idx_reader_on_mutated_files(gz, mutation):
    original = real_idx(gz)
    outcome = idx_outcome(mutate(original, *mutation))
    assert isinstance(outcome, (np.ndarray, MnnError))


def test_idx_reader_refuses_a_lying_header_quickly():
    """Dimensions that claim 2**31 - 1 elements of float64: refused from the file's size, not allocated."""
    outcome = idx_outcome(bytes([0, 0, 0x0E, 2]) + (2**31 - 1).to_bytes(4, "big") * 2 + b"\0" * 16)
    assert isinstance(outcome, MnnError) and "truncated payload" in str(outcome)


# -- the checkpoint loader ----------------------------------------------------------
def make_run():
    model = MLP(4, [3], 2, dropout=0.25, seed=0)
    optimizer = AdamW(model, lr=0.01)
    return model, optimizer, model_generators(model)


@pytest.fixture(scope="module")
def checkpoint_bytes():
    model, optimizer, generators = make_run()
    for param in model.state_dict().values():
        param += 0.5
    path = save_checkpoint(WORK / "good.safetensors", model, optimizer, generators, {"lr": 0.01}, 0, {"epoch": 1})
    return path.read_bytes(), {k: v.copy() for k, v in model.state_dict().items()}


def load_outcome(data: bytes):
    """(load_checkpoint outcome, load_model outcome); on failure the run must be untouched."""
    path = WORK / "case.safetensors"
    path.write_bytes(data)
    run = make_run()
    before = {k: v.copy() for k, v in run[0].state_dict().items()}
    with time_limit(5):
        try:
            first = load_checkpoint(path, *run)
        except MnnError as error:
            first = error
            assert all(np.array_equal(before[k], v) for k, v in run[0].state_dict().items())
        try:
            second = load_model(path)
        except MnnError as error:
            second = error
    return first, second, run[0]


@FUZZ
@given(data=st.binary(max_size=200))
def test_checkpoint_loader_on_random_bytes(data):
    first, second, _ = load_outcome(data)
    assert isinstance(first, MnnError) and isinstance(second, MnnError)
    with pytest.raises(MnnError):
        parse_safetensors(data)


@FUZZ
@given(mutation=mutations)
def test_checkpoint_loader_on_mutated_files(checkpoint_bytes, mutation):
    """A checksum covers header and data: every mutation is refused, or changes nothing that is loaded."""
    data, weights = checkpoint_bytes
    first, second, model = load_outcome(mutate(data, *mutation))
    assert isinstance(first, (dict, MnnError)) and isinstance(second, (tuple, MnnError))
    if isinstance(first, dict):
        assert all(np.array_equal(weights[k], v) for k, v in model.state_dict().items())
    if isinstance(second, tuple):
        assert all(np.array_equal(weights[k], v) for k, v in second[0].state_dict().items())


def test_unmutated_checkpoint_loads(checkpoint_bytes):
    first, second, model = load_outcome(checkpoint_bytes[0])
    assert isinstance(first, dict) and isinstance(second, tuple)


def test_time_limit_catches_a_hang():
    with pytest.raises(TimeoutError):
        with time_limit(0.05):
            while True:
                pass


def test_gzip_bomb_header_is_bounded():
    """A gzip stream whose IDX header claims far more data than the stream holds: refused, not hung."""
    data = gzip.compress(bytes([0, 0, 8, 1]) + (2**31 - 1).to_bytes(4, "big") + b"\0" * 1000)
    outcome = idx_outcome(data, "bomb.idx.gz")
    assert isinstance(outcome, MnnError)
