"""The ``mnn`` command as a user meets it: devices, usage and help, option errors, missing data without network,
sampling and evaluating a run folder or a checkpoint, nanoGPT export/import, GPT evaluation, sample options."""

import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import mnn
from mnn.cli import main
from mnn.data import download as download_module
from mnn.data import vision
from mnn.io import CHECKPOINT_NAME, WEIGHTS_NAME, load_model, read_tensors
from mnn.train.language_model import GPTTrainConfig, train_gpt

ROOT = Path(__file__).resolve().parents[1]
TEXT = "to be or not to be, that is the question.\nwhether 'tis nobler in the mind to suffer.\n" * 12


def mnn_cli(argv, capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``mnn ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnn: error: "), err
    return lines[0]


def subprocess_cli(*argv, env=None, cwd=None):
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mnn.cli", *argv], capture_output=True, text=True,
                          env=environment, cwd=cwd or ROOT, timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny GPT run stopped (as by Ctrl-C) at step 3: model.safetensors holds step 0, the checkpoint step 3."""
    root = tmp_path_factory.mktemp("cli")
    (root / "text.txt").write_text(TEXT)
    config = GPTTrainConfig(data=str(root / "text.txt"), out=str(root / "run"), block_size=8, n_layer=1, n_head=2,
                            n_embd=16, batch_size=4, max_iters=20, eval_interval=100, eval_iters=1,
                            learning_rate=3e-2, warmup_iters=1)

    def stop_at(step):
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    assert train_gpt(config, on_iteration=stop_at)["interrupted"]
    return root


# -- item 5: the device -------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["train", "mlp", "--device", "gpu"], ["--device", "gpu", "train", "gpt"],
                                  ["eval", "x.safetensors", "--device", "gpu"],
                                  ["sample", "x.safetensors", "--device", "gpu"]])
def test_device_gpu_without_cupy_is_one_line_on_every_subcommand(argv, capsys):
    code, _, err = mnn_cli(argv, capsys)
    assert code == 2
    assert "CuPy is not installed: pip install 'manual-nn[gpu]'" in one_error_line(err)


def test_device_cpu_after_the_subcommand_is_accepted(run_dir, capsys):
    code, out, _ = mnn_cli(["sample", str(run_dir / "run"), "--device", "cpu", "--tokens", "5"], capsys)
    assert code == 0 and out


@pytest.mark.parametrize("value, expected", [("tpu", "MNN_DEVICE='tpu' is not a device: expected 'cpu' or 'gpu'"),
                                             ("gpu", "MNN_DEVICE=gpu: CuPy is not installed")])
def test_mnn_device_environment_errors_are_one_line(value, expected, run_dir):
    done = subprocess_cli("sample", str(run_dir / "run"), "--tokens", "3", env={"MNN_DEVICE": value})
    assert done.returncode == 2, done.stderr
    assert expected in one_error_line(done.stderr)
    assert done.stdout == ""
    # --device on the command line wins over the environment
    done = subprocess_cli("sample", str(run_dir / "run"), "--tokens", "3", "--device", "cpu",
                          env={"MNN_DEVICE": value})
    assert done.returncode == 0, done.stderr


def test_mnn_device_in_python_is_a_clear_error_not_an_import_crash():
    code = ("import mnn\nfrom mnn.layers import Linear\n"
            "try:\n    Linear(2, 2)\nexcept mnn.MnnError as error:\n    print('ERROR', error)\n"
            "mnn.use('cpu')\nprint(Linear(2, 2).forward(__import__('numpy').ones((1, 2), 'float32')).shape)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "MNN_DEVICE": "tpu"})
    assert done.returncode == 0, done.stderr
    assert "ERROR MNN_DEVICE='tpu' is not a device: expected 'cpu' or 'gpu'" in done.stdout
    assert "(1, 2)" in done.stdout


# -- item 8: usage, version, help, option errors, folders, no network ---------------------
def test_bare_mnn_and_bare_train_print_usage_with_the_choices(capsys):
    code, out, err = mnn_cli([], capsys)
    assert code == 2 and "usage: mnn" in err
    for command in ("train", "eval", "sample", "export", "import"):
        assert command in err
    assert err.strip().splitlines()[-1].startswith("mnn: error: ")
    code, out, err = mnn_cli(["train"], capsys)
    assert code == 2 and "usage: mnn train" in err and "mlp" in err and "gpt" in err
    assert "arguments are required" not in err


def test_version(capsys):
    code, out, _ = mnn_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"mnn {mnn.__version__}" == "mnn 0.1.0"


def test_help_shows_defaults_and_presets(capsys):
    code, out, _ = mnn_cli(["train", "gpt", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    assert "--block-size" in flat and "default: 64" in flat and "default: 0.001" in flat
    assert "shakespeare-char-cpu" in flat and "shakespeare-char:" in flat and "n_embd=384" in flat
    code, out, _ = mnn_cli(["train", "mlp", "--help"], capsys)
    flat = " ".join(out.split())
    assert "default: 0.001" in flat and "fashion-best:" in flat and "hidden=[1024, 1024]" in flat
    assert "default: runs/mlp" in flat
    code, out, _ = mnn_cli(["sample", "--help"], capsys)
    flat = " ".join(out.split())
    assert "default: 500" in flat and "default: 0.8" in flat and "--num-samples" in flat


@pytest.mark.parametrize("argv, expected", [
    (["train", "gpt", "--seed", "-1"], "mnn: error: --seed: expected a non-negative integer, got -1"),
    (["train", "mlp", "--epochs", "abc"], "mnn: error: --epochs: expected a positive integer, got abc"),
    (["train", "mlp", "--lr", "-1"], "mnn: error: --lr: expected a positive number, got -1"),
])
def test_option_errors_name_the_option_first(argv, expected, capsys):
    code, _, err = mnn_cli(argv, capsys)
    assert code == 2 and one_error_line(err) == expected


def test_data_folder_and_data_dir_file_say_so(tmp_path, capsys):
    code, _, err = mnn_cli(["train", "gpt", "--data", str(tmp_path)], capsys)
    assert code == 2 and one_error_line(err) == f"mnn: error: --data: {tmp_path} is a folder, expected a text file"
    (tmp_path / "file.txt").write_text("x")
    code, _, err = mnn_cli(["train", "mlp", "--data-dir", str(tmp_path / "file.txt")], capsys)
    assert code == 2 and one_error_line(err) == (f"mnn: error: --data-dir: {tmp_path / 'file.txt'} is a file, "
                                                 "not a folder (give the folder that holds the four IDX files)")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(vision, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")

    def no_network(url, timeout=None):
        raise urllib.error.URLError("no route to host (test)")

    monkeypatch.setattr(download_module, "urlopen", no_network)
    return tmp_path / "cache"


def test_without_network_the_message_names_the_file_to_place(offline, capsys):
    code, _, err = mnn_cli(["train", "gpt", "--max-iters", "1"], capsys)
    line = one_error_line(err)
    assert code == 2 and "could not download tiny Shakespeare" in line and "no route to host" in line
    assert f"place it at {offline / 'tinyshakespeare' / 'input.txt'} or pass --data FILE" in line
    code, _, err = mnn_cli(["train", "mlp"], capsys)
    line = one_error_line(err)
    assert code == 2 and "could not download http://fashion-mnist" in line and "place the fashion-mnist files" in line
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        assert name in line
    assert f"into {offline / 'fashion-mnist'} or pass --data-dir DIR" in line


# -- item 1: sample and eval a checkpoint or a run folder ---------------------------------
def test_the_run_stopped_with_stale_weights(run_dir):
    _, weights = read_tensors(run_dir / "run" / WEIGHTS_NAME)
    _, checkpoint = read_tensors(run_dir / "run" / CHECKPOINT_NAME)
    assert json.loads(weights["step"]) == 0 and json.loads(checkpoint["step"]) == 3


def test_sample_a_checkpoint_gives_the_latest_weights_text(run_dir, capsys):
    args = ["--tokens", "60", "--seed", "3", "--prompt", "to "]
    code, from_weights, _ = mnn_cli(["sample", str(run_dir / "run" / WEIGHTS_NAME), *args], capsys)
    assert code == 0
    code, from_checkpoint, _ = mnn_cli(["sample", str(run_dir / "run" / CHECKPOINT_NAME), *args], capsys)
    assert code == 0 and from_checkpoint != from_weights
    code, from_folder, err = mnn_cli(["sample", str(run_dir / "run"), *args], capsys)
    assert code == 0 and from_folder == from_weights  # stdout holds the text only
    assert f"using {run_dir / 'run' / WEIGHTS_NAME} (step 0)" in err
    assert f"{run_dir / 'run' / CHECKPOINT_NAME} holds later weights (step 3)" in err


def test_eval_a_gpt_checkpoint_and_folder(run_dir, capsys):
    code, out, err = mnn_cli(["eval", str(run_dir / "run" / CHECKPOINT_NAME)], capsys)
    assert code == 0, err
    loss, perplexity = out.split("|")
    assert loss.startswith("val_loss ") and perplexity.strip().startswith("perplexity ")
    value = float(loss.split()[1])
    assert abs(float(perplexity.split()[1]) - np.exp(value)) < 0.01 * np.exp(value)
    assert str(run_dir / "text.txt") in err  # the text came from the run's settings
    code, again, _ = mnn_cli(["eval", str(run_dir / "run" / CHECKPOINT_NAME)], capsys)
    assert again == out  # deterministic: every window of the val split
    code, stale, _ = mnn_cli(["eval", str(run_dir / "run")], capsys)
    assert code == 0 and stale != out


def test_gpt_eval_loss_is_the_mean_over_all_val_windows(run_dir, capsys):
    from mnn.data import CharTokenizer, split_train_val
    from mnn.losses import CrossEntropyLoss

    model, metadata = load_model(run_dir / "run" / CHECKPOINT_NAME)
    tokenizer = CharTokenizer(metadata["vocab"])
    _, val = split_train_val(tokenizer.encode(TEXT), 0.9)
    T = model.config.block_size
    count = (len(val) - 1) // T
    x, y = val[:count * T].reshape(count, T), val[1:count * T + 1].reshape(count, T)
    model.eval()
    expected = CrossEntropyLoss().forward(model.forward(x), y)
    code, out, _ = mnn_cli(["eval", str(run_dir / "run" / CHECKPOINT_NAME), "--data", str(run_dir / "text.txt")],
                           capsys)
    assert code == 0 and out.startswith(f"val_loss {float(expected):.4f} | perplexity {np.exp(expected):.2f}")


# -- sample options ------------------------------------------------------------------------
def test_sample_num_samples_prompt_file_stdin_and_out(run_dir, tmp_path, capsys, monkeypatch):
    weights = str(run_dir / "run" / CHECKPOINT_NAME)
    code, out, _ = mnn_cli(["sample", weights, "--num-samples", "3", "--tokens", "20", "--prompt", "to"], capsys)
    samples = out.split("\n---------------\n")
    assert code == 0 and len(samples) == 3 and all(s.startswith("to") for s in samples)
    assert len(set(samples)) == 3
    (tmp_path / "prompt.txt").write_text("not ")
    code, out, _ = mnn_cli(["sample", weights, "--prompt-file", str(tmp_path / "prompt.txt"), "--tokens", "5"], capsys)
    assert code == 0 and out.startswith("not ")
    monkeypatch.setattr(sys, "stdin", io.StringIO("the "))
    code, out, _ = mnn_cli(["sample", weights, "--prompt-file", "-", "--tokens", "5"], capsys)
    assert code == 0 and out.startswith("the ")
    code, out, err = mnn_cli(["sample", weights, "--tokens", "5", "--out", str(tmp_path / "sample.txt")], capsys)
    assert code == 0 and out == "" and (tmp_path / "sample.txt").read_text().startswith("\n")
    code, _, err = mnn_cli(["sample", weights, "--prompt-file", str(tmp_path / "none.txt")], capsys)
    assert code == 2 and "none.txt" in one_error_line(err)


# -- export / import -----------------------------------------------------------------------
def test_export_to_pytorch_keeps_names_values_and_vocab(run_dir, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    source = run_dir / "run" / CHECKPOINT_NAME
    out = tmp_path / "nanogpt.safetensors"
    code, _, err = mnn_cli(["export", str(source), "--to", "pytorch", str(out)], capsys)
    assert code == 0, err
    state = safetensors_torch.load_file(str(out))
    model, metadata = load_model(source)
    own = model.state_dict()
    assert set(state) == set(own) and not any(name.startswith("optim.") for name in state)
    for name, value in own.items():
        assert tuple(state[name].shape) == value.shape and state[name].dtype == torch.float32
        np.testing.assert_array_equal(state[name].numpy(), value)
    with safe_open(str(out), framework="pt") as handle:
        saved = handle.metadata()
    assert saved["vocab"] == metadata["vocab"] and json.loads(saved["config"])["n_head"] == 2


def test_import_a_nanogpt_file_keeps_the_vocab_and_samples(run_dir, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, metadata = load_model(run_dir / "run" / CHECKPOINT_NAME)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    plain = tmp_path / "plain.safetensors"
    safetensors_torch.save_file(state, str(plain))  # no config, no vocab: a nanoGPT user's file
    code, _, err = mnn_cli(["import", str(plain), str(tmp_path / "mnn.safetensors")], capsys)
    assert code == 2 and "--n-head" in one_error_line(err)
    code, _, err = mnn_cli(["import", str(plain), str(tmp_path / "mnn.safetensors"), "--n-head", "2",
                            "--vocab-text", str(run_dir / "text.txt")], capsys)
    assert code == 0, err
    imported, saved = load_model(tmp_path / "mnn.safetensors")
    assert saved["vocab"] == metadata["vocab"]
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(imported.state_dict()[name], value)
    with_vocab = tmp_path / "with-vocab.safetensors"
    safetensors_torch.save_file(state, str(with_vocab), metadata={"vocab": metadata["vocab"]})
    code, _, err = mnn_cli(["import", str(with_vocab), str(tmp_path / "b.safetensors"), "--n-head", "2"], capsys)
    assert code == 0 and load_model(tmp_path / "b.safetensors")[1]["vocab"] == metadata["vocab"]
    args = ["--tokens", "30", "--seed", "5"]
    assert mnn_cli(["sample", str(tmp_path / "b.safetensors"), *args], capsys)[1] == \
        mnn_cli(["sample", str(run_dir / "run" / CHECKPOINT_NAME), *args], capsys)[1]


def test_export_import_refusals(run_dir, tmp_path, capsys):
    source = run_dir / "run" / CHECKPOINT_NAME
    code, _, err = mnn_cli(["export", str(source), "--to", "pytorch", str(source)], capsys)
    assert code == 2 and "would overwrite" in one_error_line(err)
    code, _, err = mnn_cli(["import", str(run_dir / "text.txt"), str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and not (tmp_path / "x.safetensors").exists()
