"""The whole-recipe benchmark runs both frameworks on identical batches (a short smoke run; timings not judged)."""

import json
from pathlib import Path

import pytest

from benchmarks import recipe

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data/tinyshakespeare.txt is not beside the checkout")
def test_recipe_benchmark_compares_equal_work(tmp_path):
    out = tmp_path / "recipe.json"
    report = recipe.main(["--data", str(SHAKESPEARE), "--max-iters", "6", "--eval-iters", "2", "--block", "2",
                           "--out", str(out)])
    assert json.loads(out.read_text())["runs"].keys() == {"mnn", "torch"}
    mnn_evals, torch_evals = report["runs"]["mnn"]["evaluations"], report["runs"]["torch"]["evaluations"]
    assert [e["step"] for e in mnn_evals] == [e["step"] for e in torch_evals] == [0, 3, 6]
    for ours, theirs in zip(mnn_evals, torch_evals):  # same weights, same batches: the same losses
        assert abs(ours["val"] - theirs["val"]) < 1e-3 and abs(ours["train"] - theirs["train"]) < 1e-3
    assert report["ratio"]["mnn/torch seconds"] > 0 and report["ratio"]["median over turns"] > 0
    for run in report["runs"].values():  # 6 iterations in turns of 2, then the last evaluation: 4 turns
        assert len(run["turn_seconds"]) == 4 and run["seconds"] == pytest.approx(sum(run["turn_seconds"]))
    assert "in turns of 2 iterations" in report["method"]
    # Each worker reports whether mnn's malloc settings are on in its process: PyTorch runs as its users run it.
    assert report["runs"]["torch"]["mnn_malloc_settings"] is False
    assert report["runs"]["mnn"]["mnn_malloc_settings"] is True


def test_what_mnn_reached_in_the_other_sides_wall_time():
    run = {"turn_seconds": [1.0, 1.0, 1.0, 1.0], "evaluations": [{"step": 0, "val": 4.0}, {"step": 100, "val": 2.5},
                                                                   {"step": 200, "val": 2.0}]}
    # Evaluation at step s finishes with the turn holding iterations s .. s + 49: turns end at 1, 2, 3, 4 s.
    assert recipe.within(run, 2.5, 50) == {"seconds": 2.5, "best_val": 4.0, "at_step": 0}
    assert recipe.within(run, 3.0, 50) == {"seconds": 3.0, "best_val": 2.5, "at_step": 100}
    assert recipe.within(run, 9.0, 50)["best_val"] == 2.0  # the last evaluation ends the last turn
    assert recipe.within(run, 0.5, 50)["best_val"] is None


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data/tinyshakespeare.txt is not beside the checkout")
def test_recipe_benchmark_runs_mnns_faster_preset_beside_pytorchs_recipe(tmp_path):
    report = recipe.main(["--data", str(SHAKESPEARE), "--max-iters", "4", "--eval-iters", "2", "--block", "2",
                          "--mnn-preset", "shakespeare-char-cpu-fast", "--out", str(tmp_path / "r.json")])
    assert report["mnn_preset"] == "shakespeare-char-cpu-fast" and report["mnn_config"]["max_iters"] == 4
    assert report["mnn_in_torch_time"]["seconds"] == pytest.approx(report["runs"]["torch"]["seconds"])
    assert report["runs"]["mnn"]["blas"] and report["runs"]["torch"]["blas"]["library"]
