"""Checkpoints: a run interrupted by a real signal and resumed ends bitwise-identical to a run straight through;
writes are atomic; a bad file is refused whole."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mnn.io.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_generators, save_checkpoint
from fake_data import write_fake_mnist
from mnn.errors import CheckpointError, MnnError
from mnn.io import load_model, read_tensors, save_model, save_tensors
from mnn.models import MLP
from mnn.optim import Adam

ROOT = Path(__file__).resolve().parents[1]

# Runs `mnn` in a child that sends itself a real signal right after optimizer step `stop_at`:
# an arbitrary but reproducible step, through the same handler a Ctrl-C reaches.
SELF_SIGNAL = """
import os, signal, sys
import mnn.io.safetensors
import mnn.optim
from mnn.cli import main
stop_at, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
original, calls = mnn.optim.Optimizer.step, [0]
def step(self, **options):
    original(self, **options)
    calls[0] += 1
    if calls[0] == stop_at:
        os.kill(os.getpid(), sig)
mnn.optim.Optimizer.step = step
sys.exit(main(sys.argv[3:]))
"""


def run_mnn(cwd, *args, stop_at=None, sig="SIGINT"):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "mnn.cli", *args] if stop_at is None else \
        [sys.executable, "-c", SELF_SIGNAL, str(stop_at), sig, *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def loss_lines(stdout: str) -> list[str]:
    """The logged numbers: every line with a loss or an accuracy, minus its timing (ms/step, GFLOP/s, MFU)."""
    timing = ("ms/step", "GFLOP/s")
    keep = [[part for part in line.split(" | ") if not part.endswith(timing) and not part.startswith("MFU ")]
            for line in stdout.splitlines() if line.startswith(("step ", "epoch "))]
    return [" | ".join(parts) for parts in keep]


def write_text(path: Path, chars: int = 4000) -> Path:
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while the cat sat on the mat".split()
    path.write_text(" ".join(rng.choice(words, chars // 4))[:chars] + "\n")
    return path


def assert_same_run(straight: Path, resumed: Path, straight_log: str, resumed_log: str) -> None:
    assert (resumed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert (resumed / CHECKPOINT_NAME).read_bytes() == (straight / CHECKPOINT_NAME).read_bytes()
    assert json.loads((resumed / "history.json").read_text()) == json.loads((straight / "history.json").read_text())
    assert loss_lines(resumed_log) == loss_lines(straight_log)


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mnist")
    write_fake_mnist(folder, train=300, test=100)
    return folder


MLP_ARGS = ["train", "mlp", "--dataset", "mnist", "--hidden", "24", "--dropout", "0.2", "--epochs", "3",
            "--batch-size", "25", "--log-interval", "5", "--lr", "3e-3", "--optimizer", "adamw",
            "--weight-decay", "0.01", "--out", "run"]


@pytest.fixture(scope="module")
def mlp_straight(mnist_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    return cwd / "run", run_mnn(cwd, *MLP_ARGS, "--data-dir", str(mnist_dir))


@pytest.mark.parametrize("stop_at, sig", [(7, "SIGINT"), (12, "SIGTERM"), (29, "SIGINT")])
def test_mlp_interrupted_and_resumed_equals_straight_run(stop_at, sig, mnist_dir, mlp_straight, tmp_path):
    """12 steps per epoch: 7 is mid-epoch (mid log interval too), 12 an epoch's last step, 29 in epoch 3."""
    straight, straight_log = mlp_straight
    first = run_mnn(tmp_path, *MLP_ARGS, "--data-dir", str(mnist_dir), stop_at=stop_at, sig=sig)
    assert f"stopped by {sig} at step {stop_at} of 36" in first
    assert "resume with: mnn train mlp --resume run" in first
    assert (tmp_path / "run" / CHECKPOINT_NAME).exists()
    second = run_mnn(tmp_path, "train", "mlp", "--resume", "run")
    assert f"resumed from run/{CHECKPOINT_NAME} at step {stop_at}" in second
    assert_same_run(straight, tmp_path / "run", straight_log, first + second)


GPT_ARGS = ["train", "gpt", "--data", "text.txt", "--block-size", "16", "--n-layer", "2", "--n-head", "2",
            "--n-embd", "32", "--batch-size", "4", "--max-iters", "40", "--eval-interval", "10",
            "--eval-iters", "3", "--log-interval", "5", "--dropout", "0.1", "--out", "run"]


@pytest.fixture(scope="module")
def gpt_straight(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    write_text(cwd / "text.txt")
    return cwd / "run", run_mnn(cwd, *GPT_ARGS)


@pytest.mark.parametrize("stop_at, sig", [(13, "SIGINT"), (20, "SIGTERM")])
def test_gpt_interrupted_and_resumed_equals_straight_run(stop_at, sig, gpt_straight, tmp_path):
    """13 is between evaluations; 20 is an evaluation step (the resumed run evaluates first)."""
    straight, straight_log = gpt_straight
    write_text(tmp_path / "text.txt")
    first = run_mnn(tmp_path, *GPT_ARGS, stop_at=stop_at, sig=sig)
    assert f"stopped by {sig} at step {stop_at} of 40" in first
    assert "resume with: mnn train gpt --resume run" in first
    second = run_mnn(tmp_path, "train", "gpt", "--resume", "run")
    assert_same_run(straight, tmp_path / "run", straight_log, first + second)


def test_gpt_resume_can_extend_the_run_but_not_change_the_model(gpt_straight, tmp_path):
    straight, _ = gpt_straight
    write_text(tmp_path / "text.txt")
    run_mnn(tmp_path, *GPT_ARGS[:-2], "--out", str(tmp_path / "copy"), stop_at=5)
    more = run_mnn(tmp_path, "train", "gpt", "--resume", "copy", "--max-iters", "45")
    assert "step 45 | train" in more
    result = subprocess.run([sys.executable, "-m", "mnn.cli", "train", "gpt", "--resume", "copy", "--block-size", "32"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "mnn: error: cannot change on resume: --block-size 32 (the checkpoint has 16)"


def test_an_external_sigint_saves_and_exits_zero(tmp_path):
    """A real Ctrl-C from outside, at whatever step the child has reached."""
    write_text(tmp_path / "text.txt")
    args = [a if a != "40" else "100000" for a in GPT_ARGS]
    child = subprocess.Popen([sys.executable, "-m", "mnn.cli", *args], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().startswith("gpt 2x32")
        assert child.stdout.readline().startswith("step 0 | train")
        time.sleep(0.3)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert "resume with: mnn train gpt --resume run" in out
    _, metadata = read_tensors(tmp_path / "run" / CHECKPOINT_NAME)
    step = json.loads(metadata["step"])
    assert 0 < step < 100000 and f"stopped by SIGINT at step {step} of 100000" in out


# -- durable writes ---------------------------------------------------------
def small_run(seed=0):
    model = MLP(6, [5], 3, dropout=0.5, seed=seed)
    optimizer = Adam(model, lr=0.1)
    return model, optimizer, model_generators(model)


def train_steps(model, optimizer, steps=3):
    from mnn.losses import CrossEntropyLoss

    loss_fn, rng = CrossEntropyLoss(), np.random.default_rng(1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn.forward(model.forward(rng.standard_normal((4, 6)).astype(np.float32)), rng.integers(0, 3, 4))
        model.backward(loss_fn.backward())
        optimizer.step()


def write_checkpoint(path, model, optimizer, generators, step=3):
    return save_checkpoint(path, model, optimizer, generators, {"note": "test"}, step, {"where": step})


def snapshot(model, optimizer, generators):
    return ({k: v.copy() for k, v in model.state_dict().items()}, optimizer.state_dict(),
            {k: g.bit_generator.state for k, g in generators.items()})


def assert_unchanged(before, after):
    for one, two in zip(before[:2], after[:2]):
        assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    assert before[2] == after[2]


def test_a_checkpoint_restores_weights_moments_and_generators(tmp_path):
    model, optimizer, generators = small_run()
    train_steps(model, optimizer)
    path = write_checkpoint(tmp_path / CHECKPOINT_NAME, model, optimizer, generators)
    saved = snapshot(model, optimizer, generators)
    fresh = small_run(seed=0)
    metadata = load_checkpoint(path, *fresh)
    assert metadata["state"] == {"where": 3} and metadata["step"] == 3 and metadata["format"] == "pt"
    assert_unchanged(saved, snapshot(*fresh))
    assert oct(path.stat().st_mode & 0o777) != "0o600"  # not mkstemp's private mode


def test_a_failing_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    model, optimizer, generators = small_run()
    path = write_checkpoint(tmp_path / CHECKPOINT_NAME, model, optimizer, generators)
    before = path.read_bytes()
    train_steps(model, optimizer)

    import mnn.io

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(mnn.io.safetensors.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(path, model, optimizer, generators, step=6)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    assert load_checkpoint(path, *small_run())["step"] == 3


WRITER = """
import sys, numpy
from mnn.io import save_tensors
for i in range(1000000):
    save_tensors(sys.argv[1], {"w": numpy.full(2_000_000, i, dtype=numpy.float32)}, {"i": str(i)})
    print(i, flush=True)
"""


def test_killing_the_writer_mid_write_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "w.safetensors"
    for delay in (0.0, 0.013, 0.041):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        writer.stdout.readline()  # one complete write exists
        time.sleep(delay)
        writer.kill()  # SIGKILL: no handler, no cleanup, anywhere inside a write
        writer.wait()
        tensors, metadata = read_tensors(path)
        assert np.all(tensors["w"] == float(metadata["i"]))  # a whole file, old or new, never a mix


def test_a_nan_model_is_never_checkpointed(tmp_path):
    from mnn.errors import TrainingError

    model, optimizer, generators = small_run()
    path = write_checkpoint(tmp_path / CHECKPOINT_NAME, model, optimizer, generators)
    before = path.read_bytes()
    model[0].params["weight"][0, 0] = np.nan
    with pytest.raises(TrainingError, match=r"the weights became non-finite \(0.weight\)"):
        write_checkpoint(path, model, optimizer, generators)
    assert path.read_bytes() == before


# -- safe loading -----------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model, optimizer, generators = small_run()
    train_steps(model, optimizer)
    return write_checkpoint(tmp_path / CHECKPOINT_NAME, model, optimizer, generators)


def refuses(path, match, run=None):
    """The loader raises CheckpointError matching ``match`` and leaves the run untouched."""
    run = run or small_run(seed=0)
    before = snapshot(*run)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, *run)
    assert_unchanged(before, snapshot(*run))


def test_truncated_empty_and_corrupted_files_are_refused(saved, tmp_path):
    data = saved.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for size in (0, 5, 8, 100, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:size])
        refuses(bad, "empty or truncated|truncated or foreign|not valid JSON|outside the")
    flipped = bytearray(data)
    flipped[-3] ^= 0x10  # a bit of the last weight
    bad.write_bytes(bytes(flipped))
    refuses(bad, "corrupted file \\(its CRC-32 is ")
    bad.write_bytes(data + b"\0")
    refuses(bad, "1 bytes after the last tensor")


def test_foreign_and_weights_only_files_are_refused(saved, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_tensors(foreign, {"embeddings": np.zeros((3, 2), np.float32)}, {"format": "pt"})
    refuses(foreign, "not an mnn checkpoint")
    weights = save_model(tmp_path / "model.safetensors", small_run()[0])
    refuses(weights, "an mnn weights file, not a training checkpoint")
    (tmp_path / "text.safetensors").write_text("hello, world")
    refuses(tmp_path / "text.safetensors", "not a safetensors file")
    refuses(tmp_path / "missing.safetensors", "no such file")
    refuses(tmp_path, "is a folder")


def test_mismatched_checkpoints_are_refused_whole(saved, tmp_path):
    other_model = MLP(6, [7], 3, dropout=0.5, seed=0)
    other = (other_model, Adam(other_model, lr=0.1), model_generators(other_model))
    refuses(saved, r"model config differs from this model's \(hidden: file \[5\], model \[7\]\)", other)
    tensors, metadata = read_tensors(saved)
    edited = tmp_path / "edited.safetensors"
    for change, match in [
        (lambda t: t.update({"0.weight": np.zeros((5, 7), np.float32)}), r"0.weight: expected shape \(5, 6\)"),
        (lambda t: t.update({"optim.exp_avg.0.weight": np.zeros((5, 7), np.float32)}), "optimizer exp_avg.0.weight"),
        (lambda t: t.pop("optim.step"), "optimizer missing step"),
        (lambda t: t.update({"3.bias": np.full(3, np.inf, np.float32)}), "3.bias: holds NaN or infinite"),
        (lambda t: t.update({"0.bias": np.zeros(5, np.int32)}), "0.bias: dtype int32"),
        (lambda t: t.update({"extra": np.zeros(1, np.float32)}), "unexpected extra"),
    ]:
        changed = dict(tensors)
        change(changed)
        save_tensors(edited, changed, metadata)
        refuses(edited, match)
    rng = json.loads(metadata["rng"])
    rng["model.2"]["bit_generator"] = "MT19937"
    save_tensors(edited, tensors, {**metadata, "rng": rng})
    refuses(edited, "random generator model.2: unusable state")


def test_load_model_reads_a_checkpoint_and_refuses_a_lying_config(saved, tmp_path):
    model, metadata = load_model(saved)
    assert metadata["kind"] == "mnn-checkpoint" and isinstance(model, MLP)
    tensors, meta = read_tensors(saved)
    config = json.loads(meta["config"])
    for key, value, match in [("hidden", [5000000], r"config expects 0.weight of shape \(5000000, 6\)"),
                              ("activation", "swish", "unknown activation"),
                              ("kind", "resnet", "unknown model kind")]:
        save_tensors(tmp_path / "lying.safetensors", tensors, {**meta, "config": {**config, key: value}})
        with pytest.raises(CheckpointError, match=match):
            load_model(tmp_path / "lying.safetensors")


def test_no_pickle_anywhere():
    for path in [*ROOT.glob("mnn/**/*.py"), *ROOT.glob("tools/*.py")]:
        text = path.read_text()
        assert "import pickle" not in text and "torch.load(" not in text and "allow_pickle=True" not in text, path


def test_errors_are_the_library_type():
    assert issubclass(CheckpointError, MnnError)
