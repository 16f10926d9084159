"""Bad input everywhere: every case a user can get wrong ends in one clear line, and docs/bad-input.md is the
table of exactly those lines (regenerate with `MNN_UPDATE_DOCS=1 pytest tests/test_robustness.py`).
Also: a non-finite loss stops training and keeps the last good checkpoint, or is skipped on request."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import mnn.losses
from mnn import backend
from mnn.io.checkpoint import CHECKPOINT_NAME
from mnn.cli import main
from mnn.data import write_idx
from mnn.errors import InputError, MnnError, ShapeError, TrainingError
from mnn.io import read_tensors, save_tensors
from mnn.train.language_model import GPTTrainConfig, train_gpt
from mnn.train.classifier import MLPTrainConfig, train_mlp

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad-input.md"

GPT_SMALL = ["--block-size", "8", "--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--batch-size", "2",
             "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1"]
MLP_SMALL = ["--dataset", "mnist", "--data-dir", "data", "--hidden", "8", "--batch-size", "20", "--log-interval", "5"]


def write_fake_mnist(folder: Path, train: int = 60, test: int = 20) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in [("train", train), ("t10k", test)]:
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (count, 28, 28)).astype(np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, count).astype(np.uint8))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with data, a text, a trained MLP and GPT, and broken files; the cases run inside it."""
    root = tmp_path_factory.mktemp("bad-input")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        write_fake_mnist(root / "data")
        write_fake_mnist(root / "broken")
        (root / "broken" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x3c" + b"\x01" * 10)
        (root / "text.txt").write_text("to be or not to be, that is the question. " * 20)
        (root / "short.txt").write_text("just a few words\n")
        (root / "other.txt").write_text("Ein ganz anderer Text, mit anderen Buchstaben! " * 20)
        (root / "empty.txt").write_text("")
        (root / "notes.safetensors").write_text("hello")
        assert main(["train", "mlp", *MLP_SMALL, "--out", "mlp"]) == 0
        assert main(["train", "gpt", "--data", "text.txt", *GPT_SMALL, "--out", "gpt"]) == 0
        tensors, _ = read_tensors(root / "gpt" / CHECKPOINT_NAME)
        save_tensors(root / "plain.safetensors", {k: v for k, v in tensors.items() if not k.startswith("optim.")},
                     {})  # a nanoGPT state dict without config
        data = (root / "gpt" / CHECKPOINT_NAME).read_bytes()
        (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
        flipped = bytearray(data)
        flipped[len(data) - 5] ^= 4
        (root / "flipped").mkdir()
        (root / "flipped" / CHECKPOINT_NAME).write_bytes(bytes(flipped))
        (root / "nothing").mkdir()
        yield root
    finally:
        os.chdir(cwd)


# (what is wrong, the command) -> the one line the user sees; in docs/bad-input.md as a table
CASES = [
    ("a non-numeric option", "train mlp --epochs abc"),
    ("a zero count", "train mlp --batch-size 0"),
    ("a fractional count", "train gpt --max-iters 2.5"),
    ("a negative learning rate", "train mlp --lr -1"),
    ("a NaN learning rate", "train gpt --learning-rate nan"),
    ("dropout out of range", "train mlp --dropout 1.5"),
    ("a negative weight decay", "train gpt --weight-decay -0.1"),
    ("an unknown choice", "train mlp --optimizer lbfgs"),
    ("an unknown model", "train resnet"),
    ("a missing data folder", "train mlp --dataset mnist --data-dir no/such/folder"),
    ("a data folder with a broken IDX file", "train mlp --dataset mnist --data-dir broken"),
    ("batch size larger than the data", "train mlp --dataset mnist --data-dir data --batch-size 64"),
    ("a missing text file", "train gpt --data missing.txt"),
    ("an empty text file", "train gpt --data empty.txt"),
    ("block size larger than the text", "train gpt --data short.txt --block-size 64"),
    ("heads that do not divide the width", "train gpt --data text.txt --n-embd 30 --n-head 4"),
    ("a missing weights file", "eval no/such/model.safetensors"),
    ("a folder instead of a file", "eval data"),
    ("a file that is not safetensors", "eval notes.safetensors"),
    ("a truncated checkpoint", "sample truncated.safetensors"),
    ("a GPT evaluated on a text with other characters", "eval gpt/model.safetensors --data other.txt"),
    ("an MLP given to sample", "sample mlp/model.safetensors"),
    ("a prompt with unknown characters", "sample gpt/model.safetensors --prompt Zürich"),
    ("zero temperature", "sample gpt/model.safetensors --temperature 0"),
    ("resume from a folder that does not exist", "train gpt --resume no/such/run"),
    ("resume from a folder without a checkpoint", "train gpt --resume nothing"),
    ("resume with a different block size", "train gpt --resume gpt --block-size 16"),
    ("resume with a preset", "train gpt --resume gpt --preset shakespeare-char"),
    ("resume an MLP run as a GPT", "train gpt --resume mlp"),
    ("resume from a corrupted checkpoint", "train gpt --resume flipped"),
    ("resume with another text", "train gpt --resume gpt --data other.txt --max-iters 8"),
    ("resume past the end of the run", "train gpt --resume gpt --max-iters 2"),
    ("--device gpu without CuPy (after the command too)", "train mlp --device gpu"),
    ("an unknown device in MNN_DEVICE", "MNN_DEVICE=tpu sample gpt/model.safetensors"),
    ("a folder given as --data", "train gpt --data data"),
    ("a file given as --data-dir", "train mlp --data-dir text.txt"),
    ("a negative seed", "train gpt --seed -1"),
    ("a run folder without weights", "sample nothing"),
    ("a prompt file that does not exist", "sample gpt --prompt-file missing.txt"),
    ("an MLP given to export", "export mlp/model.safetensors --to pytorch mlp-torch.safetensors"),
    ("export onto its own input", "export gpt/model.safetensors --to pytorch gpt/model.safetensors"),
    ("import of a file that is not a nanoGPT state dict", "import mlp/model.safetensors imported.safetensors"),
    ("import of a state dict without its number of heads", "import plain.safetensors imported.safetensors"),
    ("a learning rate that blows up", "train mlp --dataset mnist --data-dir data --hidden 8 --batch-size 20 "
                                      "--optimizer sgd --lr 1e30 --out blowup"),
]


def run_case(command: str, capsys, monkeypatch) -> tuple[int, str]:
    """Exit status and the single stderr line of ``mnn COMMAND`` (``VAR=value mnn ...`` sets the environment
    first, as the import of mnn reads it)."""
    words = command.split()
    with monkeypatch.context() as patch:
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            name, value = words.pop(0).split("=", 1)
            patch.setenv(name, value)
            patch.setattr(backend, "_environment_problem", None)
            backend._use_environment()  # what the import does with the variable
        try:
            code = main(words)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnn: error: "), err
    return code, lines[0]


def stable(line: str) -> str:
    """The line with checksums shown as ``<crc32>``: they depend on the trained weights, which differ
    in the last bits between machines (BLAS kernels), while the message itself must not."""
    return re.sub(r"(CRC-32 is |the header says )[0-9a-f]{8}", r"\1<crc32>", line)


def table(rows) -> str:
    head = ["<!-- generated by tests/test_robustness.py: `MNN_UPDATE_DOCS=1 pytest tests/test_robustness.py` -->",
            "", "# Bad input and what you see", "",
            "Every mistake below ends in **one line on stderr and exit status 2**, never a traceback, and",
            "nothing on disk is changed. The commands run in a folder holding a small dataset (`data/`), a",
            "broken copy (`broken/`), texts and trained runs (`mlp/`, `gpt/`); the test that runs them",
            "checks that this page shows exactly what they print.", "",
            "Training itself: **Ctrl-C or SIGTERM** saves `checkpoint.safetensors` at the current step and",
            "exits 0 with `resume with: mnn train gpt --resume DIR`. A **NaN or infinite loss or gradient**",
            "stops the run (last row) and keeps the last good checkpoint; `--skip-nonfinite` skips such",
            "steps instead. A checkpoint is never written with non-finite weights, and every file is written",
            "to a temporary file, fsync'd and renamed, so a crash or a full disk leaves the previous one.", "",
            "| What is wrong | Command | What you see |", "| --- | --- | --- |"]
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    shell = lambda command: re.sub(r"^((?:[A-Z_]+=\S* )*)", r"\1mnn ", command)  # noqa: E731 - env first
    body = [f"| {what} | `{escape(shell(command))}` | `{escape(stable(line))}` |" for what, command, line in rows]
    return "\n".join(head + body) + "\n"


def test_every_bad_input_gets_one_clear_line_and_the_doc_shows_it(workdir, capsys, monkeypatch):
    rows = []
    for what, command in CASES:
        code, line = run_case(command, capsys, monkeypatch)
        assert code == 2, (command, line)
        rows.append((what, command, line))
    text = table(rows)
    if os.environ.get("MNN_UPDATE_DOCS"):
        DOC.write_text(text)
    assert DOC.exists() and DOC.read_text() == text, "docs/bad-input.md is out of date: MNN_UPDATE_DOCS=1 pytest " \
                                                     "tests/test_robustness.py"
    assert not (workdir / "blowup" / "model.safetensors").exists()
    assert not (workdir / "imported.safetensors").exists() and not (workdir / "mlp-torch.safetensors").exists()


# -- non-finite losses ---------------------------------------------------------------
def nan_loss_at(monkeypatch, calls_to_poison):
    """Make CrossEntropyLoss.forward return NaN on the given (1-based) calls of each loss object.

    Each replica (mnn.parallel) has its own loss object, so every replica's
    count goes as without replicas, whichever thread or process runs it (a
    replica process forks with its count so far); the NaN must reach the loss
    of the whole batch.
    """
    original, counts = mnn.losses.CrossEntropyLoss.forward, {}

    def forward(self, logits, targets):
        loss = original(self, logits, targets)
        counts[id(self)] = counts.get(id(self), 0) + 1
        return loss * np.float32("nan") if counts[id(self)] in calls_to_poison else loss

    monkeypatch.setattr(mnn.losses.CrossEntropyLoss, "forward", forward)


def test_mlp_nan_stops_and_keeps_the_epoch_checkpoint(workdir, tmp_path, monkeypatch):
    config = MLPTrainConfig(dataset="mnist", data_dir=str(workdir / "data"), hidden=[8], epochs=2, batch_size=20,
                            out=str(tmp_path))
    nan_loss_at(monkeypatch, {5})  # 3 steps an epoch: the 2nd step of epoch 2
    with pytest.raises(TrainingError) as error:
        train_mlp(config)
    assert str(error.value).startswith("loss became nan at step 5: training stopped; the last good checkpoint "
                                       f"(step 3) is kept in {tmp_path / CHECKPOINT_NAME}")
    tensors, metadata = read_tensors(tmp_path / CHECKPOINT_NAME)
    assert json.loads(metadata["step"]) == 3 and all(np.isfinite(t).all() for t in tensors.values())


def test_mlp_skip_nonfinite_skips_the_step(workdir, tmp_path, monkeypatch, capsys):
    config = MLPTrainConfig(dataset="mnist", data_dir=str(workdir / "data"), hidden=[8], epochs=2, batch_size=20,
                            out=str(tmp_path), skip_nonfinite=True, log_interval=1)
    nan_loss_at(monkeypatch, {2})
    assert train_mlp(config)["steps"] == 6
    printed = capsys.readouterr().out
    assert "step 2 | loss nan: step skipped" in printed and "step 3 | loss " in printed


def test_mlp_huge_learning_rate_never_checkpoints_nan_weights(workdir, tmp_path, capsys):
    config = MLPTrainConfig(dataset="mnist", data_dir=str(workdir / "data"), hidden=[8], epochs=3, batch_size=20,
                            optimizer="sgd", lr=1e30, out=str(tmp_path), skip_nonfinite=True)
    # step 1 blows the weights up (still finite); every later loss is NaN and skipped
    with pytest.raises(TrainingError, match=r"every step of epoch 2 was skipped .* the last good checkpoint \(step 3\)"):
        train_mlp(config)
    tensors, _ = read_tensors(tmp_path / CHECKPOINT_NAME)
    assert all(np.isfinite(t).all() for t in tensors.values())


def gpt_config(workdir, out, **changes):
    options = dict(data=str(workdir / "text.txt"), out=str(out), block_size=8, n_layer=1, n_head=2, n_embd=8,
                   batch_size=2, max_iters=6, eval_interval=2, eval_iters=1)
    return GPTTrainConfig(**{**options, **changes})


def test_gpt_nan_stops_and_keeps_the_last_checkpoint(workdir, tmp_path, monkeypatch):
    # loss calls: eval 0 (2), steps 0-1 (2), eval 2 (2), steps 2-3 (2): the 8th is step 3's
    nan_loss_at(monkeypatch, {8})
    with pytest.raises(TrainingError) as error:
        train_gpt(gpt_config(workdir, tmp_path))
    assert str(error.value).startswith(f"loss became nan at step 3: training stopped; the last good checkpoint (step 2) "
                                       f"is kept in {tmp_path / CHECKPOINT_NAME}")
    assert "resume with: mnn train gpt --resume" in str(error.value)
    tensors, metadata = read_tensors(tmp_path / CHECKPOINT_NAME)
    assert json.loads(metadata["step"]) == 2 and all(np.isfinite(t).all() for t in tensors.values())


def test_gpt_skip_nonfinite_and_a_broken_evaluation(workdir, tmp_path, monkeypatch, capsys):
    nan_loss_at(monkeypatch, {4})
    result = train_gpt(gpt_config(workdir, tmp_path, skip_nonfinite=True))
    assert result["iters"] == 6 and "step 1 | loss nan: step skipped" in capsys.readouterr().out
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    nan_loss_at(monkeypatch, {3})  # the first evaluation of a resumed, extended run (the train split)
    with pytest.raises(TrainingError, match=r"the evaluated loss is nan \(train\) / .* \(val\) at step 8"):
        train_gpt(gpt_config(workdir, tmp_path, max_iters=10), resume=tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before


# -- the Python API names the layer, the expected and the actual shape ------------------
def test_api_errors_name_the_layer_and_both_shapes():
    from mnn.models.gpt import GPT, GPTConfig
    from mnn.layers import Linear
    from mnn.losses import CrossEntropyLoss

    with pytest.raises(ShapeError, match=r"Linear\(784, 256.*expected input \(\.\.\., 784\), got shape \(64, 100\)"):
        Linear(784, 256).forward(np.zeros((64, 100), np.float32))
    with pytest.raises(InputError, match=r"target class 10 out of range \[0, 10\)"):
        CrossEntropyLoss().forward(np.zeros((2, 10), np.float32), np.array([3, 10]))
    model = GPT(GPTConfig(block_size=4, vocab_size=5, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(InputError, match=r"id 7 out of range \[0, 5\)"):
        model.forward(np.array([[1, 7]]))
    with pytest.raises(ShapeError, match="sequence length T=6 exceeds block_size=4"):
        model.forward(np.zeros((1, 6), np.int64))
    assert model.generate(np.zeros((1, 6), np.int64), 2, rng=0).shape == (1, 8)  # a longer prompt is cropped
    assert issubclass(TrainingError, MnnError)


def test_checkpoint_interval_adds_checkpoints(workdir, tmp_path, monkeypatch):
    import mnn.train.loop

    steps, original = [], mnn.train.loop.save_checkpoint
    monkeypatch.setattr(mnn.train.loop, "save_checkpoint",
                        lambda path, model, opt, gens, config, step, state, **extra:
                        steps.append((step, state["evaluated"])) or original(path, model, opt, gens, config, step,
                                                                              state, **extra))
    train_gpt(gpt_config(workdir, tmp_path, max_iters=7, eval_interval=100, checkpoint_interval=3))
    assert steps == [(0, True), (3, False), (6, False), (7, True)]
