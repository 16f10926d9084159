"""The GPU path without a GPU: the strict stand-in (mnn.strict) catches host crossings, and the suites pass on it."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mnn
from mnn import backend, jit, strict
from mnn.backend import asarray, to_numpy, xp
from mnn.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
needs_text = pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data/tinyshakespeare.txt is not beside the checkout")
# The layer, model, checkpoint and training tests rerun on the stand-in (the compiled-path cases skip there).
STRICT_SUITES = ["tests/test_layers.py", "tests/test_transformer.py", "tests/test_gpt.py", "tests/test_checkpoint.py",
                 "tests/test_batchnorm.py", "tests/test_conv.py", "tests/test_pooling.py", "tests/test_rnn.py",
                 "tests/test_loop.py", "tests/test_train_gpt.py"]


@pytest.fixture
def strict_device():
    """Compute on the stand-in for the test, strict everywhere (no leniency for the test's own code)."""
    previous_module, previous_device = xp._module, backend.device
    lenient = strict.allow_outside_library(False)
    mnn.use("strict")
    try:
        yield strict
    finally:
        xp._module, backend.device = previous_module, previous_device
        strict.allow_outside_library(lenient)


def test_the_stand_in_refuses_every_implicit_host_conversion(strict_device):
    a = asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    host = np.ones(3, dtype=np.float32)
    refused = {
        "numpy.asarray": lambda: np.asarray(a),
        "a numpy ufunc": lambda: np.sqrt(a),
        "a numpy function": lambda: np.concatenate([a, a]),
        "tolist": lambda: a.tolist(),
        "float of many": lambda: float(a),
        "int of many": lambda: int(a[0]),
        "bool of many": lambda: bool(a > 0),
        "device + host": lambda: a + host,
        "host + device": lambda: host + a,
        "host into device": lambda: a.__setitem__(0, host),
        "host index": lambda: a[np.array([0, 1])],
        "host into xp": lambda: xp.tanh(host),
        "formatting": lambda: f"{xp.sum(a):.3f}",
    }
    for what, attempt in refused.items():
        with pytest.raises(TypeError):
            attempt()
            pytest.fail(f"{what} was not refused")
    with pytest.raises(AttributeError):
        xp.errstate  # noqa: B018 - numpy only: CuPy has none
    assert not hasattr(strict.StrictArray, "__array_interface__")


def test_allowed_crossings_are_counted_and_reductions_stay_on_the_device(strict_device):
    strict.reset_counts()
    a = asarray(np.arange(6, dtype=np.float32))  # to_device 1
    total = xp.sum(a * 2)
    assert isinstance(total, strict.StrictArray) and total.shape == ()  # a 0-d array, as CuPy's reductions
    assert isinstance(np.float32(2) * a, strict.StrictArray)  # a numpy scalar operand is a device operation
    assert float(total) == 30.0 and total.item() == 30.0 and bool(total > 1)  # three synchronisations
    np.testing.assert_array_equal(to_numpy(a), np.arange(6))  # to_host 1
    assert strict.counts == {"to_host": 4, "to_device": 1, "outside": 0}


def test_a_hidden_host_round_trip_in_library_code_fails_even_where_tests_may_cross(strict_device):
    """The suite's boundary lets tests read results with numpy; code inside mnn stays strict."""
    source = ("import numpy\n"
              "def layer_forward(x):\n"
              "    return x * float(numpy.asarray(x).mean())\n")  # the host round-trip a GPU would refuse
    library = {"__name__": "mnn.layers.hidden_round_trip"}
    exec(compile(source, "<mnn.layers.hidden_round_trip>", "exec"), library)  # noqa: S102
    x = asarray(np.ones((2, 2), dtype=np.float32))
    strict.allow_outside_library(True)
    with pytest.raises(strict.HostCrossingError, match="numpy.asarray"):
        library["layer_forward"](x)
    np.testing.assert_array_equal(np.asarray(x), 1.0)  # the test's own read is allowed there, and counted
    assert strict.counts["outside"] >= 1


@needs_text
def test_a_gpt_training_step_reads_back_only_its_scalars_and_equals_the_cpu_bitwise(strict_device, tmp_path):
    """Per step: the loss and the gradient norm (the loop's scalars, the second for its non-finite guard); the
    range checks of the token ids and the targets ride along with the loss's read-back; the batch's two arrays
    go to the device. The run equals numpy's, bit for bit."""
    from mnn.train.language_model import GPTTrainConfig, train_gpt  # noqa: PLC0415

    def config(out):
        return GPTTrainConfig(data=str(SHAKESPEARE), out=str(out), block_size=8, n_layer=1, n_head=2, n_embd=16,
                              batch_size=4, max_iters=8, eval_interval=4, eval_iters=2, log_interval=2, seed=0, replicas=1)

    marks = []
    result = train_gpt(config(tmp_path / "strict"), on_iteration=lambda it: marks.append((it, dict(strict.counts))))
    per_step = [{key: after[key] - before[key] for key in after}
                for (it, before), (_, after) in zip(marks, marks[1:]) if it % 4]  # steps without an evaluation
    assert per_step and all(step == {"to_host": 2, "to_device": 2, "outside": 0} for step in per_step), per_step

    xp._module, backend.device = np, "cpu"
    previous = jit.set_enabled(False)  # the same arithmetic: the numpy path (no compiled loops on the device)
    try:
        on_cpu = train_gpt(config(tmp_path / "cpu"))
    finally:
        jit.set_enabled(previous)
    assert {k: v for k, v in result.items() if k != "ms_per_step"} == \
        {k: v for k, v in on_cpu.items() if k != "ms_per_step"}


@pytest.mark.slow
@pytest.mark.skipif(backend.device == "strict", reason="already on the strict device")
def test_the_layer_model_checkpoint_and_training_tests_pass_on_the_strict_device():
    env = {**os.environ, "MNN_DEVICE": "strict", "PYTHONPATH": str(ROOT)}
    deselect = ["--deselect", "tests/test_rnn.py::test_the_time_loops_block_product_equals_one_product"]  # not a Module
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *deselect,
                           *STRICT_SUITES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


def test_an_id_out_of_range_on_the_device_is_refused_with_the_losss_read_back(strict_device):
    """No read of its own: the check waits for the loss's read-back and is settled there, before any backward."""
    from mnn.losses import CrossEntropyLoss  # noqa: PLC0415
    from mnn.models.gpt import GPT, GPTConfig  # noqa: PLC0415

    model, loss_fn = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8), seed=0), CrossEntropyLoss()
    ids, targets = asarray(np.array([[1, 2, 11]])), asarray(np.array([[2, 3, 4]]))
    strict.reset_counts()
    logits = model.forward(ids)  # the id 11 of a vocabulary of 11: not read back yet
    loss = loss_fn.forward(logits, targets)
    assert strict.counts["to_host"] == 0
    with pytest.raises(InputError, match="id 11 out of range"):
        backend.read_scalar(loss)
    assert backend.read_scalar(loss_fn.forward(model.forward(asarray(np.array([[1, 2, 3]]))), targets)) > 0
    logits = model.forward(ids)
    with pytest.raises(InputError, match="id 11 out of range"):
        to_numpy(logits)  # any value leaving the device settles the checks first
    assert to_numpy(logits).shape == (1, 3, 11)  # settled once: nothing waits any more
