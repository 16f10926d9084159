"""The char-rnn through the language-model loop: it beats a bigram model, resumes bit for bit, samples, evaluates."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mnn.cli import main
from mnn.io import CHECKPOINT_NAME
from mnn.train.language_model import CharRNNTrainConfig, sample_file, train_char_rnn

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
needs_text = pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data/tinyshakespeare.txt is not beside the checkout")
BIGRAM_VAL_LOSS = 2.49  # the best a model of the previous character alone reaches on this split (tests/test_train_gpt.py)
TEXT = "to be or not to be, that is the question. whether 'tis nobler in the mind to suffer. " * 12


@needs_text
@pytest.mark.slow
def test_a_small_lstm_beats_a_bigram_model_in_a_few_hundred_steps(tmp_path):
    config = CharRNNTrainConfig(data=str(SHAKESPEARE), out=str(tmp_path), block_size=32, n_embd=32, hidden_size=128,
                                num_layers=1, batch_size=16, max_iters=400, learning_rate=1e-2, min_lr=1e-3,
                                warmup_iters=20, eval_interval=200, eval_iters=20, seed=0)
    result = train_char_rnn(config)
    assert result["best_val"] < BIGRAM_VAL_LOSS, result
    text = sample_file(tmp_path / "model.safetensors", prompt="ROMEO:", tokens=100, seed=1)
    assert text.startswith("ROMEO:") and len(text) == 106


def small(tmp_path, out, **changes):
    (tmp_path / "text.txt").write_text(TEXT)
    options = dict(data=str(tmp_path / "text.txt"), out=str(tmp_path / out), block_size=8, n_embd=8,
                   hidden_size=12, num_layers=2, dropout=0.1, batch_size=4, max_iters=12, eval_interval=4,
                   eval_iters=2, warmup_iters=2)
    return CharRNNTrainConfig(**{**options, **changes})


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_resumed_char_rnn_run_equals_the_straight_one_bitwise(tmp_path, cell):
    def ctrl_c_at_6(it):
        if it == 6:
            os.kill(os.getpid(), signal.SIGINT)

    straight = train_char_rnn(small(tmp_path, "straight", cell=cell))
    assert train_char_rnn(small(tmp_path, "resumed", cell=cell), on_iteration=ctrl_c_at_6)["interrupted"]
    resumed = train_char_rnn(small(tmp_path, "resumed", cell=cell), resume=tmp_path / "resumed")
    assert {k: v for k, v in resumed.items() if k != "ms_per_step"} == \
        {k: v for k, v in straight.items() if k != "ms_per_step"}
    a, b = load_file(tmp_path / "straight" / CHECKPOINT_NAME), load_file(tmp_path / "resumed" / CHECKPOINT_NAME)
    assert sorted(a) == sorted(b) and "rnn.weight_hh_l1" in a
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_the_cli_trains_samples_and_evaluates_a_char_rnn(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["train", "lstm", "--data", "text.txt", "--block-size", "8", "--n-embd", "8", "--hidden-size", "12",
                 "--batch-size", "4", "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2",
                 "--out", "run"]) == 0
    assert "lstm 2x12" in capsys.readouterr().out
    assert main(["sample", "run", "--prompt", "to be", "--tokens", "20", "--num-samples", "2"]) == 0
    samples = capsys.readouterr().out.split("---------------")
    assert len(samples) == 2 and all(s.strip().startswith("to be") for s in samples)
    assert main(["eval", "run/model.safetensors", "--data", "text.txt"]) == 0
    assert "val_loss" in capsys.readouterr().out
