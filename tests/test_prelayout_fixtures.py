"""Files written by the mnn of before the module re-layout still load, evaluate, sample and resume bit for bit.

The fixtures in ``tests/fixtures/prelayout`` were made by its ``make_fixtures.py``
at the commit named in ``expected.json``. These tests use only the command line
(``mnn.cli.main``) and safetensors, never a module path that may move.

Resuming must give the recorded final tensors bitwise. numba's compiled loops
and plain numpy (``MNN_JIT=0``) round differently, so ``expected.json`` holds the
final digests for both compute paths; a resumed run must match one of them
exactly, weights and optimizer state alike. Since GELU's float32 loop computes
``tanh`` as a rational function (:mod:`mnn.layers.gelu`), and LayerNorm's and the
softmax backward's loops sum in float32 (they summed in float64, by accident of a
literal ``0``), the GPT's compiled path rounds differently from the old code's: its
resume is checked against the digests this code recorded (``resumed_compiled_now``,
recorded again with each such change), and its resume on the numpy path, whose
arithmetic did not change, against the old code's.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from fake_data import write_fake_mnist
from mnn import jit
from mnn.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "prelayout"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
OPTIM_PREFIX = "optim."


def digests(path: Path) -> dict:
    """As make_fixtures.py: sha256 of the weights and of the ``optim.`` tensors (each over the C-order bytes
    in sorted-key order; ``optim`` only when there are any), and one sha256 per tensor."""
    tensors = load_file(str(path))
    whole = {"weights": hashlib.sha256(), "optim": hashlib.sha256()}
    per_tensor = {}
    for key in sorted(tensors):
        data = tensors[key].tobytes(order="C")
        whole["optim" if key.startswith(OPTIM_PREFIX) else "weights"].update(data)
        per_tensor[key] = hashlib.sha256(data).hexdigest()
    found = {"weights": whole["weights"].hexdigest()}
    if any(key.startswith(OPTIM_PREFIX) for key in tensors):
        found["optim"] = whole["optim"].hexdigest()
    return {**found, "tensors": per_tensor}


def cli(capsys, *args: str) -> str:
    """``mnn ARGS`` in-process; its stdout (it must exit 0)."""
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    assert code == 0, f"mnn {' '.join(map(str, args))} exited {code}: {captured.err}"
    return captured.out


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory) -> Path:
    """The fake MNIST the MLP fixtures were trained on (tests/fake_data.py, seed 0, 600/200 images)."""
    folder = tmp_path_factory.mktemp("prelayout-mnist")
    write_fake_mnist(folder)
    return folder


def check_resumed(folder: Path, paths: dict) -> None:
    """The resumed run's final checkpoint (and best weights) equal one recorded run's (``paths``: name -> digests),
    bitwise."""
    got = {"checkpoint": digests(folder / "checkpoint.safetensors")}
    weights = folder / "model.safetensors"
    for jit, want in paths.items():
        if got["checkpoint"] == want["checkpoint"]:
            if want["model"] is None:
                assert not weights.exists(), f"MNN_JIT={jit}: the old run wrote no best weights after resuming"
            else:
                assert digests(weights) == want["model"], f"MNN_JIT={jit}: the checkpoint matches, the weights not"
            return
    differing = {jit: sorted(key for key, digest in got["checkpoint"]["tensors"].items()
                             if want["checkpoint"]["tensors"].get(key) != digest) or "(no single tensor: the keys or a whole digest)"
                 for jit, want in paths.items()}
    pytest.fail(f"the resumed checkpoint matches neither recorded compute path; differing tensors: {differing}")


def records_of(model: str, compiled: bool = True) -> dict:
    """The recorded final digests a resumed run may equal: the old code's on its two compute paths, and the
    compiled path's of this code where it rounds differently (the GPT's: ``resumed_compiled_now``)."""
    entry = EXPECTED[model]
    old = {f"old code, MNN_JIT={EXPECTED['made_with']['MNN_JIT']}": {"checkpoint": entry["checkpoint"],
                                                                      "model": entry["model"]},
           f"old code, MNN_JIT={entry['resumed_other_path']['MNN_JIT']}": entry["resumed_other_path"]}
    if "resumed_compiled_now" not in entry:
        return old
    numpy_path = {name: digest for name, digest in old.items() if name.endswith("MNN_JIT=0")}
    return {**numpy_path, "this code, MNN_JIT=1": entry["resumed_compiled_now"]} if compiled else numpy_path


def test_old_mlp_weights_evaluate_to_the_recorded_accuracy(capsys, fake_mnist):
    out = cli(capsys, "eval", FIXTURES / "mlp" / "model.safetensors", "--data-dir", fake_mnist)
    assert out == EXPECTED["mlp"]["eval_stdout"]


def test_old_gpt_weights_sample_the_recorded_text(capsys):
    out = cli(capsys, "sample", FIXTURES / "gpt" / "model.safetensors", *EXPECTED["gpt"]["sample_args"])
    assert out == EXPECTED["gpt"]["sample_stdout"]


def test_old_mlp_checkpoint_resumes_to_the_recorded_weights(capsys, fake_mnist, tmp_path):
    run = shutil.copytree(FIXTURES / "mlp_mid", tmp_path / "mlp_mid")  # the resumed run writes into its folder
    epochs = EXPECTED["mlp"]["train_args"][EXPECTED["mlp"]["train_args"].index("--epochs") + 1]
    cli(capsys, "train", "mlp", "--resume", run, "--data-dir", fake_mnist, "--epochs", epochs)
    check_resumed(run, records_of("mlp"))


def resume_gpt(capsys, tmp_path) -> Path:
    run = shutil.copytree(FIXTURES / "gpt_mid", tmp_path / "gpt_mid")
    iters = EXPECTED["gpt"]["train_args"][EXPECTED["gpt"]["train_args"].index("--max-iters") + 1]
    cli(capsys, "train", "gpt", "--resume", run, "--data", FIXTURES / "text.txt", "--max-iters", iters)
    return run


def test_old_gpt_checkpoint_resumes_to_the_recorded_weights(capsys, tmp_path):
    check_resumed(resume_gpt(capsys, tmp_path), records_of("gpt"))


def test_old_gpt_checkpoint_resumes_on_the_numpy_path_to_the_old_codes_weights(capsys, tmp_path):
    """Where the arithmetic did not change (plain numpy, MNN_JIT=0), the old checkpoint still reaches the old
    code's final tensors bitwise."""
    previous = jit.set_enabled(False)
    try:
        run = resume_gpt(capsys, tmp_path)
    finally:
        jit.set_enabled(previous)
    check_resumed(run, records_of("gpt", compiled=False))
