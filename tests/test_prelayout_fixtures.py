"""Files written by the mnn of before the module re-layout still load, evaluate, sample and resume bit for bit.

The fixtures in ``tests/fixtures/prelayout`` were made by its ``make_fixtures.py``
at the commit named in ``expected.json``. These tests use only the command line
(``mnn.cli.main``) and safetensors, never a module path that may move.

Resuming must give the recorded final tensors bitwise. numba's compiled loops
and plain numpy (``MNN_JIT=0``) round differently, so ``expected.json`` holds the
final digests for both compute paths; a resumed run must match one of them
exactly, weights and optimizer state alike.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from fake_data import write_fake_mnist
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


def check_resumed(folder: Path, record: dict) -> None:
    """The resumed run's final checkpoint (and best weights) equal one recorded compute path's, bitwise."""
    paths = {record["made_with"]["MNN_JIT"]: record["final"],
             record["final_other"]["MNN_JIT"]: record["final_other"]}
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


def record_of(model: str) -> dict:
    entry = EXPECTED[model]
    return {"made_with": EXPECTED["made_with"],
            "final": {"checkpoint": entry["checkpoint"], "model": entry["model"]},
            "final_other": entry["resumed_other_path"]}


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
    check_resumed(run, record_of("mlp"))


def test_old_gpt_checkpoint_resumes_to_the_recorded_weights(capsys, tmp_path):
    run = shutil.copytree(FIXTURES / "gpt_mid", tmp_path / "gpt_mid")
    iters = EXPECTED["gpt"]["train_args"][EXPECTED["gpt"]["train_args"].index("--max-iters") + 1]
    cli(capsys, "train", "gpt", "--resume", run, "--data", FIXTURES / "text.txt", "--max-iters", iters)
    check_resumed(run, record_of("gpt"))
