"""The shared training loop (mnn.train.loop), as a new user meets it: stops, resumes, history rows, saved settings."""

import csv
import json
import os
import signal

import pytest

import mnn.train.classifier
from fake_data import write_fake_mnist
from mnn.cli import main
from mnn.errors import CheckpointError
from mnn.io import CHECKPOINT_NAME, load_model
from mnn.train.classifier import MLPTrainConfig, train_mlp
from mnn.train.language_model import GPTTrainConfig, train_gpt
from mnn.train.loop import loop_state

TEXT = "to be or not to be, that is the question. " * 20


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def gpt_config(text, out, **changes):
    options = dict(data=str(text), out=str(out), block_size=8, n_layer=1, n_head=2, n_embd=8, batch_size=2,
                   max_iters=7, eval_interval=4, eval_iters=1, log_interval=1, replicas=1)
    return GPTTrainConfig(**{**options, **changes})


def history_steps(folder):
    with open(folder / "history.csv", newline="") as file:
        return [int(row["step"]) for row in csv.DictReader(file)]


def test_one_history_row_per_step_when_the_last_evaluation_is_off_the_interval(text, tmp_path):
    # evaluations at 0, 4 and 7 (the end); a log row after every step: steps 4 and 7 have both
    train_gpt(gpt_config(text, tmp_path / "run"))
    steps = history_steps(tmp_path / "run")
    assert steps == sorted(set(steps)) == list(range(8))
    rows = json.loads((tmp_path / "run" / "history.json").read_text())
    assert {"loss", "val", "train", "lr"} <= set(rows[-1])  # the log row and the evaluation, joined


def test_the_run_folder_keeps_its_settings(text, tmp_path):
    config = gpt_config(text, tmp_path / "run", max_iters=2)
    train_gpt(config)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert GPTTrainConfig(**saved) == config


@pytest.mark.parametrize("command, length", [("gpt", ["--max-iters", "3"]), ("mlp", ["--epochs", "1"])])
def test_resume_below_the_saved_step_is_refused_naming_both_numbers(text, tmp_path, capsys, monkeypatch, command,
                                                                   length):
    monkeypatch.chdir(tmp_path)
    if command == "gpt":
        assert main(["train", "gpt", "--data", str(text), "--block-size", "8", "--n-layer", "1", "--n-head", "2",
                     "--n-embd", "8", "--batch-size", "2", "--max-iters", "5", "--eval-interval", "5",
                     "--eval-iters", "1", "--out", "run"]) == 0
        saved = 5
    else:
        write_fake_mnist(tmp_path / "data", train=60, test=20)
        assert main(["train", "mlp", "--dataset", "mnist", "--data-dir", "data", "--hidden", "8", "--epochs", "2",
                     "--batch-size", "20", "--out", "run"]) == 0
        saved = 6
    capsys.readouterr()
    before = (tmp_path / "run" / CHECKPOINT_NAME).read_bytes()
    assert main(["train", command, "--resume", "run", *length]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mnn: error: ") and len(err.splitlines()) == 1
    assert f"at step {saved}" in err and f"ends at step {int(length[1]) * (3 if command == 'mlp' else 1)}" in err
    assert (tmp_path / "run" / CHECKPOINT_NAME).read_bytes() == before  # nothing lost
    # the same length as the finished run: nothing to do, said as plainly
    with pytest.raises(CheckpointError, match=f"at step {saved}.*nothing to train"):
        if command == "gpt":
            train_gpt(gpt_config(text, tmp_path / "run", max_iters=5, eval_interval=5, replicas=2),
                      resume=tmp_path / "run")
        else:
            config = MLPTrainConfig(dataset="mnist", data_dir="data", hidden=[8], epochs=2, batch_size=20, out="run")
            train_mlp(config, resume=tmp_path / "run")


def test_a_stopped_gpt_run_says_which_file_holds_which_weights(text, tmp_path, capsys):
    out = tmp_path / "run"

    def stop_at_3(it):
        if it == 3:
            os.kill(os.getpid(), signal.SIGINT)

    result = train_gpt(gpt_config(text, out, max_iters=50, eval_interval=20), on_iteration=stop_at_3)
    printed = capsys.readouterr().out
    assert result["interrupted"] and result["iters"] == 3
    assert f"stopped by SIGINT at step 3 of 50: checkpoint (the weights at step 3" in printed
    assert f"the best weights (val {result['best_val']:.4f} at step 0) in {out / 'model.safetensors'}" in printed
    assert f"mnn sample {out / CHECKPOINT_NAME}" in printed
    _, weights = load_model(out / "model.safetensors")
    _, latest = load_model(out / CHECKPOINT_NAME)
    assert weights["step"] == 0 and latest["step"] == 3


def test_a_signal_during_the_final_save_waits_for_the_outputs(tmp_path, monkeypatch, capsys):
    write_fake_mnist(tmp_path / "data", train=60, test=20)
    original = mnn.train.classifier.save_model

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the weights are written
        return original(*args, **kwargs)

    monkeypatch.setattr(mnn.train.classifier, "save_model", interrupted_save)
    config = MLPTrainConfig(dataset="mnist", data_dir=str(tmp_path / "data"), hidden=[8], epochs=1, batch_size=20,
                            out=str(tmp_path / "run"))
    result = train_mlp(config)
    assert "interrupted" not in result and result["steps"] == 3
    assert "SIGINT came while the outputs were written: they are complete" in capsys.readouterr().out
    for name in ("model.safetensors", "history.csv", "history.json", "loss.png", CHECKPOINT_NAME):
        assert (tmp_path / "run" / name).stat().st_size > 0


def test_checkpoints_of_the_loops_before_the_shared_one_are_read():
    old_mlp_at_epoch_end = {"epoch": 3, "batches_done": 0, "running": [0.5], "history": [], "result": {},
                            "last_loss": 0.5}
    assert loop_state(old_mlp_at_epoch_end, 6) == {"evaluated": True, "lr": None, "running": [0.5],
                                                   "last_loss": 0.5, "history": []}
    old_mlp_mid_epoch = {**old_mlp_at_epoch_end, "epoch": 2, "batches_done": 1}
    assert loop_state(old_mlp_mid_epoch, 4)["evaluated"] is False
    old_gpt = {"evaluated": True, "last": {}, "lr": 1e-3, "best_val": None, "history": [{"step": 0}]}
    assert loop_state(old_gpt, 250) == {"evaluated": True, "lr": 1e-3, "running": [], "last_loss": None,
                                        "history": [{"step": 0}]}
