"""The MLP pipeline end to end: the make-run bar on real Fashion-MNIST, eval from the file alone, CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fake_data import write_fake_mnist
from mnn.cli import main
from mnn.io import load_model
from mnn.train.classifier import MLPTrainConfig, train_mlp

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="Debian package dataset-fashion-mnist not installed")


@needs_fashion
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_recipe_reaches_085_after_one_epoch(seed, tmp_path):
    result = train_mlp(MLPTrainConfig(seed=seed, out=str(tmp_path)))
    assert result["test_acc"] >= 0.85, result


def test_train_then_eval_from_the_file_alone(tmp_path, capsys):
    write_fake_mnist(tmp_path / "data", gzip=True)
    out = tmp_path / "run"
    code = main(["train", "mlp", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--hidden", "32", "16",
                 "--epochs", "3", "--batch-size", "25", "--log-interval", "5", "--lr", "3e-3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "step 10 | loss " in printed and " ms/step" in printed
    final = [line for line in printed.splitlines() if "test_acc" in line][-1]
    accuracy = float(final.split("test_acc ")[1])
    assert accuracy >= 0.9  # the bands make the classes separable
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history if "test_acc" in row] == [1, 2, 3]
    assert (out / "history.csv").read_text().startswith("step,epoch,")

    model, metadata = load_model(out / "model.safetensors")
    assert metadata["format"] == "pt" and metadata["config"]["hidden"] == [32, 16]
    assert [name for name, _ in model.named_parameters()] == [
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert main(["eval", str(out / "model.safetensors"), "--data-dir", str(tmp_path / "data")]) == 0
    assert capsys.readouterr().out.strip() == f"test_acc {accuracy:.4f}"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mnn.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["train", "mlp", "--epochs", "abc"], "--epochs: expected a positive integer, got abc"),
    (["train", "mlp", "--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["train", "mlp", "--lr", "-1"], "--lr: expected a positive number, got -1"),
    (["train", "mlp", "--dropout", "1.5"], "--dropout: expected a probability in [0, 1), got 1.5"),
    (["train", "mlp", "--optimizer", "lbfgs"], "--optimizer: invalid choice: 'lbfgs'"),
    (["train", "resnet"], "mnn train: invalid choice: 'resnet'"),
    (["eval", "no/such/model.safetensors"], "no/such/model.safetensors: no such file"),
    (["train", "mlp", "--data-dir", "no/such/folder"], "no/such/folder"),
])
def test_cli_errors_are_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnn: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_refuses_a_broken_data_folder_and_a_non_weights_file(tmp_path):
    write_fake_mnist(tmp_path, gzip=True)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x02\x58" + b"\x01" * 10)
    result = run_cli("train", "mlp", "--dataset", "mnist", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "train-labels-idx1-ubyte" in result.stderr
    not_weights = tmp_path / "notes.safetensors"
    not_weights.write_text("hello")
    result = run_cli("eval", str(not_weights))
    assert result.returncode == 2 and "not a safetensors file" in result.stderr
    assert "Traceback" not in result.stderr


def test_batch_larger_than_the_data_is_refused(tmp_path):
    write_fake_mnist(tmp_path, train=40, test=10, gzip=True)
    result = run_cli("train", "mlp", "--dataset", "mnist", "--data-dir", str(tmp_path), "--batch-size", "64")
    assert result.returncode == 2
    assert "batch size 64 is larger than the 40 training images" in result.stderr
