"""The benchmark's output is right (not its timings), and the speed paths compute what the plain ones do.

``python -m benchmarks.compare --quick`` runs every case for a few steps; the
checks are on what it writes: every case, positive times, ratios that are the
quotients of the times, peak memory for both frameworks, and the same loss
from mnn and PyTorch on the first step of each case (so the two sides did the
same work).
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime

import numpy as np
import pytest

from benchmarks import compare, kernel
from benchmarks.cases import all_cases
from benchmarks.workers import Worker, environment, in_turns, side_environment
from mnn.layers import Linear

ORIGINAL_CORETYPE = os.environ.get("OPENBLAS_CORETYPE")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    printed = compare.main(["--quick", "--threads", "1", "--steps", "2", "--no-compile", "--out", str(out)])
    return out, printed, json.loads((out / "results.json").read_text())


def test_every_case_is_in_the_json(quick_run):
    _, printed, results = quick_run
    assert set(results["cases"]) == {case.name for case in all_cases()}
    assert results == json.loads(json.dumps(printed))  # what main returned is what it wrote
    assert results["quick"] is True


def test_times_are_positive_and_ratios_are_their_quotients(quick_run):
    for name, case in quick_run[2]["cases"].items():
        ms = case["ms"]
        for side in ("mnn", "torch", "floor"):
            assert math.isfinite(ms[side]) and ms[side] > 0, (name, side, ms)
        ratio = case["ratio"]
        assert ratio["mnn/torch"] == pytest.approx(ms["mnn"] / ms["torch"], rel=1e-12)
        assert ratio["mnn/floor"] == pytest.approx(ms["mnn"] / ms["floor"], rel=1e-12)
        assert ratio["torch/floor"] == pytest.approx(ms["torch"] / ms["floor"], rel=1e-12)
        assert case["steps"] == 2 and case["units_per_step"] >= 1 and case["steps_per_block"] >= 1
        assert all(spread >= 0 for spread in case["spread"].values())


class FakeSide:
    """A worker stand-in whose every step took ``seconds``; records the size of each block it was asked for."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.blocks = seconds, []

    def call(self, run: int) -> dict:
        self.blocks.append(run)
        return {"times": [self.seconds] * run}


def test_a_fast_step_is_timed_for_min_seconds_in_several_interleaved_blocks(monkeypatch):
    monkeypatch.setattr(compare, "SETTLE_SECONDS", 0.0)
    sides = {"mnn": FakeSide(0.001), "torch": FakeSide(0.002), "floor": FakeSide(0.0005)}
    times, block = compare.time_interleaved(sides, steps=60, warmup=1, block_seconds=0.1, min_seconds=1.0)
    assert block == 50  # 0.1 s of the slowest side's 2 ms steps
    assert {name: len(values) for name, values in times.items()} == {"mnn": 500, "torch": 500, "floor": 500}
    assert sides["torch"].blocks[1:] == [50] * 10  # after the warm-up: ten blocks, not one
    times, _ = compare.time_interleaved(sides, steps=60, warmup=1, block_seconds=0.1, min_seconds=0.0)
    assert len(times["mnn"]) == 60  # no minimum: exactly the steps asked for


def test_mnn_and_torch_computed_the_same_first_loss(quick_run):
    for name, case in quick_run[2]["cases"].items():
        losses = case["first_loss"]
        assert math.isfinite(losses["mnn"]) and losses["mnn"] > 0, (name, losses)
        assert losses["mnn"] == pytest.approx(losses["torch"], rel=1e-4), name


def test_peak_memory_is_measured_for_both_frameworks(quick_run):
    results = quick_run[2]
    assert "fresh subprocess" in results["memory_method"]
    for name, case in results["cases"].items():
        assert set(case["peak_mb"]) == {"mnn", "torch"}
        for framework, megabytes in case["peak_mb"].items():
            assert math.isfinite(megabytes) and megabytes > 0, (name, framework, megabytes)
        # Importing PyTorch, or numba for mnn's compiled loops, is outside the peak and reported apart.
        assert case["import_mb"]["torch"] > 50, (name, case["import_mb"])
        assert (case["import_mb"]["mnn"] > 20) is case["mnn_jit"], (name, case["import_mb"])  # numba or nothing
    # mnn's second replica of the language models and the CNN is a forked process: its memory is counted too
    # (the quick run's --threads 1 still builds two replicas, as the training loops do)
    for name in ("gpt_train", "cnn_train", "lstm_train_b12"):
        assert results["cases"][name]["replica_processes_mb"] > 1, (name, results["cases"][name])
    assert results["cases"]["mlp_train_b64"]["replica_processes_mb"] == 0  # one model, no replicas


def test_machine_date_bars_and_chart(quick_run):
    out, _, results = quick_run
    machine = results["machine"]
    assert machine["threads"] == 1 and machine["cores"] >= 1 and machine["cpu_model"]
    assert machine["numpy"] == np.__version__ and machine["torch"]
    assert "OPENBLAS_CORETYPE" in machine
    datetime.fromisoformat(results["date"])
    for bar, verdict in results["bars"].items():
        case = bar.split()[0]
        if " time " in bar:
            assert verdict["value"] == results["cases"][case]["ratio"]["mnn/torch"]
        assert verdict["pass"] == (verdict["value"] <= float(bar.split("<=")[1]))
    assert len(results["bars"]) == 8  # seven time bars (MLP x2, GPT x2, CNN, LSTM x2), the GPT memory bar
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = compare.format_table(results)
    assert all(name in table for name in results["cases"])


# -- the speed paths --------------------------------------------------------------
def test_linear_without_input_gradient_gives_the_same_parameter_gradients():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7))
    dy = rng.standard_normal((5, 3))
    full = Linear(7, 3, rng=np.random.default_rng(1), dtype=np.float64)
    skip = Linear(7, 3, rng=np.random.default_rng(1), dtype=np.float64, input_grad=False)
    np.testing.assert_array_equal(full.forward(x), skip.forward(x))
    assert full.backward(dy) is not None
    assert skip.backward(dy) is None
    for key in ("weight", "bias"):
        np.testing.assert_array_equal(full.grads[key], skip.grads[key])
    assert "input_grad=False" in repr(skip) and "input_grad" not in repr(full)


def test_the_torch_cnn_and_char_rnn_load_mnns_state_dicts_and_compute_the_same_logits():
    torch = pytest.importorskip("torch")
    from benchmarks import torch_models
    from mnn.models import CNN, CharRNN

    rng = np.random.default_rng(0)
    for mnn_model, torch_model, x in (
            (CNN(seed=0).eval(), torch_models.cnn().eval(), rng.standard_normal((3, 1, 28, 28), dtype=np.float32)),
            (CharRNN(65, 16, 32, 2, seed=0), torch_models.CharRNN(65, 16, 32, 2), rng.integers(0, 65, (2, 7)))):
        torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in mnn_model.state_dict().items()})
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(mnn_model.forward(x), expected, rtol=1e-4, atol=1e-5)


def test_the_new_cases_have_bars_and_their_floors_run():
    from benchmarks.cases_conv_rnn import CONV_SHAPES, conv_rnn_cases

    names = [case.name for case in conv_rnn_cases()]
    assert names == ["cnn_train", *CONV_SHAPES, "lstm_train_b12", "lstm_train_b32"]
    assert {"cnn_train", "lstm_train_b12", "lstm_train_b32"} <= set(compare.BARS)
    assert all(compare.BARS[name] == 1.0 for name in ("cnn_train", "lstm_train_b12", "lstm_train_b32"))


def test_sides_take_turns_a_b_then_b_a_until_each_is_done():
    calls, remaining = [], {"mnn": 3, "torch": 2}

    def block(name):
        calls.append(name)
        remaining[name] -= 1
        return remaining[name] == 0

    in_turns(["mnn", "torch"], block)
    assert calls == ["mnn", "torch", "torch", "mnn", "mnn"]


def test_pytorch_runs_without_mnns_malloc_settings_unless_asked(quick_run):
    assert side_environment("torch") == {"MNN_RETAIN_FREED_MEMORY": "0"}
    assert side_environment("torch", "mnn") == {} and side_environment("mnn") == {}
    assert quick_run[2]["torch_malloc"] == "default"
    for case in quick_run[2]["cases"].values():  # as reported by each worker process itself
        assert case["mnn_malloc_settings"]["torch"] is False and case["mnn_malloc_settings"]["mnn"] is True
    with pytest.raises(ValueError, match="torch_malloc"):
        side_environment("torch", "fast")


def test_a_failing_worker_shows_its_error():
    with pytest.raises(RuntimeError, match=r"(?s)exited with code [1-9]:.*Traceback.*StopIteration"):
        Worker("benchmarks.compare", ["--worker", "no_such_case", "mnn"])


def test_each_case_records_that_mnn_ran_its_compiled_loops(quick_run):
    # numba is a test dependency, so the mnn worker must have had mnn.jit on (unless MNN_JIT=0 was set).
    expected = __import__("os").environ.get("MNN_JIT", "1") != "0"
    assert quick_run[2]["machine"]["numba"]
    for name, case in quick_run[2]["cases"].items():
        assert case["mnn_jit"] is expected, name


def test_every_figure_names_its_kernel_and_counts_its_flops(quick_run):
    machine = quick_run[2]["machine"]
    assert machine["blas"] and all(pool["kernel"] and pool["version"] for pool in machine["blas"])
    assert machine["torch_blas"]["library"] and machine["torch_blas"]["kernel"]
    assert machine["peak_sgemm_gflops"] > 1
    assert "blas_environment" in machine
    for name, case in quick_run[2]["cases"].items():
        assert set(case["blas"]) == {"mnn", "torch", "floor"}
        def libraries(side):  # library, version, kernel (the thread counts may differ)
            return [(pool["library"], pool["version"], pool["kernel"]) for pool in case["blas"][side]]

        floor = [pool for pool in libraries("floor") if pool[0] != "mkl"]
        assert libraries("mnn")[:len(floor)] == floor  # both load numpy's BLAS; mnn's side may add MKL
        added = [pool[0] for pool in libraries("mnn")[len(floor):]]  # once MKL multiplied
        assert added in ([["mkl"], []] if machine["mnn_blas"]["library"] == "mkl" else [[]]), name
        if name == "gpt_train":
            assert added == (["mkl"] if machine["mnn_blas"]["library"] == "mkl" else [])
        assert case["matmul_flops_per_step"] > 0, name
        for side, ms in case["ms"].items():  # GFLOP/s is the floor's products over each side's time
            expected = case["matmul_flops_per_step"] / (ms * case["units_per_step"]) / 1e6
            assert case["gflops"][side] == pytest.approx(expected, rel=1e-9)
            assert case["mfu"][side] == pytest.approx(case["gflops"][side] / machine["peak_sgemm_gflops"], rel=1e-9)


def test_mnn_takes_the_cpu_makers_kernel_unless_told():
    """auto: MKL on an Intel CPU where it is installed, numpy's OpenBLAS on AMD or without MKL; a choice wins."""
    assert kernel.mnn_library("auto", "GenuineIntel", True)[0] == "mkl"
    assert kernel.mnn_library("auto", "AuthenticAMD", True) == (
        "numpy", "numpy's OpenBLAS (the CPU is AuthenticAMD, not Intel; --mnn-blas auto)")
    assert "MKL is not installed" in kernel.mnn_library("auto", "GenuineIntel", False)[1]
    assert kernel.mnn_library("numpy", "GenuineIntel", True)[0] == "numpy"
    assert kernel.mnn_library("mkl", "AuthenticAMD", True)[0] == "mkl"
    with pytest.raises(SystemExit, match="MKL is not installed"):
        kernel.mnn_library("mkl", "GenuineIntel", False)
    assert side_environment("mnn", mnn_blas="mkl")["MNN_BLAS"] == "mkl"
    assert side_environment("floor", mnn_blas="mkl")["MNN_BLAS"] == "mkl"  # the floor multiplies as mnn does
    assert "MNN_BLAS" not in side_environment("torch", mnn_blas="mkl")


def test_the_floor_counts_two_flops_per_multiply_add():
    from benchmarks.cases import floor_side, gemm, linear_gemms

    assert floor_side([gemm(3, 4, 5)]).flops == 2 * 3 * 4 * 5
    assert floor_side(linear_gemms(8, 16, 32)).flops == 3 * 2 * 8 * 16 * 32  # forward, dW, dX
    assert floor_side([gemm(3, 4, 5, batch=6)]).flops == 6 * 2 * 3 * 4 * 5


def test_a_forced_older_openblas_kernel_is_dropped_for_the_workers_only():
    forced = {**os.environ, "OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "512"}
    own = kernel.kernel_under({k: v for k, v in forced.items() if k not in kernel.FORCING})
    assert kernel.kernel_under(forced) == "Haswell"
    drop, record = kernel.benchmark_environment(environ=forced)
    assert record["as_set"] == "Haswell" and record["own"] == own
    if own != "Haswell":  # an AVX-512 CPU: OpenBLAS's own kernel is newer than the one forced
        assert drop == ["OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"] and "run without" in record["message"]
    kept, record = kernel.benchmark_environment(keep=True, environ=forced)
    assert kept == [] and record["dropped"] == []
    clean = {k: v for k, v in os.environ.items() if k not in kernel.FORCING}
    assert kernel.benchmark_environment(environ=clean) == ([], {"forced": {}, "as_set": None, "own": None,
                                                                  "dropped": [], "message": None})
    assert "OPENBLAS_CORETYPE" not in environment({"OPENBLAS_CORETYPE": None, **dict.fromkeys(drop)})
    assert os.environ.get("OPENBLAS_CORETYPE") == ORIGINAL_CORETYPE  # this process's environment is untouched


def test_torch_compile_side_for_the_gpt_compiles_apart_and_computes_the_same_loss(tmp_path):
    results = compare.main(["--quick", "--threads", "1", "--steps", "2", "--cases", "gpt_train", "--no-memory",
                            "--out", str(tmp_path)])
    case = results["cases"]["gpt_train"]
    assert set(case["ms"]) == {"mnn", "torch", "floor", "torch_compile"}
    assert case["ratio"]["mnn/torch_compile"] == pytest.approx(case["ms"]["mnn"] / case["ms"]["torch_compile"])
    assert case["first_loss"]["torch_compile"] == pytest.approx(case["first_loss"]["mnn"], rel=1e-4)
    # Compiling happens in the first (untimed) step: far longer than a timed step.
    assert case["first_step_seconds"]["torch_compile"] > 10 * case["ms"]["torch_compile"] / 1000
    assert "gpt_train time mnn/torch.compile <= 1.0" in results["bars"]
