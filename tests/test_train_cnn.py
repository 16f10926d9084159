"""The CNN through the classifier loop: it learns Fashion-MNIST, resumes bit for bit, and its weights run in torch.nn."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fake_data import write_fake_mnist
from mnn.data import read_idx, write_idx
from mnn.io import CHECKPOINT_NAME, load_model
from mnn.train.classifier import CNNTrainConfig, evaluate_file, standardize, train_cnn

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian package dataset-fashion-mnist not installed")


def fashion_subset(folder: Path, train: int, test: int) -> Path:
    """The first ``train``/``test`` images of Fashion-MNIST, written as the four IDX files of a data folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in [("train", train), ("t10k", test)]:
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            write_idx(folder / f"{prefix}-{kind}", read_idx(FASHION / f"{prefix}-{kind}.gz")[:count])
    return folder


@needs_fashion
@pytest.mark.slow
def test_the_default_cnn_learns_fashion_mnist_from_a_tenth_of_it(tmp_path):
    data = fashion_subset(tmp_path / "data", 6000, 1000)
    config = CNNTrainConfig(data_dir=str(data), channels=[16, 32], hidden=64, epochs=2, batch_size=64,
                            warmup_steps=20, out=str(tmp_path / "run"))
    result = train_cnn(config)
    assert result["test_acc"] > 0.80, result  # chance is 0.10; an MLP of this budget reaches about 0.78
    assert evaluate_file(tmp_path / "run" / "model.safetensors", data) == result["test_acc"]


def small_config(data, out, **changes):
    options = dict(dataset="mnist", data_dir=str(data), channels=[4, 8], hidden=16, dropout=0.2, augment=True,
                   epochs=2, batch_size=50, warmup_steps=5, out=str(out))
    return CNNTrainConfig(**{**options, **changes})


def test_a_resumed_cnn_run_equals_the_straight_one_bitwise(tmp_path):
    write_fake_mnist(tmp_path / "data", train=200, test=100)
    straight = train_cnn(small_config(tmp_path / "data", tmp_path / "straight"))
    train_cnn(small_config(tmp_path / "data", tmp_path / "resumed", epochs=1))  # inside the warm-up: same rates
    resumed = train_cnn(small_config(tmp_path / "data", tmp_path / "resumed"), resume=tmp_path / "resumed")
    assert resumed == straight
    a, b = load_file(tmp_path / "straight" / CHECKPOINT_NAME), load_file(tmp_path / "resumed" / CHECKPOINT_NAME)
    assert sorted(a) == sorted(b) and "1.running_var" in a and "1.num_batches_tracked" in a
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_the_trained_cnn_runs_unchanged_in_torch_nn(tmp_path):
    write_fake_mnist(tmp_path / "data", train=200, test=100)
    train_cnn(small_config(tmp_path / "data", tmp_path / "run", epochs=1, dropout=0.0))
    model, metadata = load_model(tmp_path / "run" / "model.safetensors")
    nn = torch.nn
    reference = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(8 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 10))
    state = {key: torch.from_numpy(np.array(value)) for key, value in model.state_dict().items()}
    reference.load_state_dict(state, strict=True)
    config = metadata["config"]
    images = standardize(read_idx(tmp_path / "data" / "t10k-images-idx3-ubyte"), config["mean"], config["std"], "cnn")
    model.eval()
    reference.eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(np.ascontiguousarray(images))).numpy()
    np.testing.assert_allclose(model.forward(images), expected, rtol=1e-4, atol=1e-5)
