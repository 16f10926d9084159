"""The device check: mnn on one GPU against PyTorch on the same GPU, and nanoGPT's GPU recipe, as JSON.

Run it through ``tools/device_check.sh OUT_DIR`` (on a GPU machine: CuPy,
PyTorch with CUDA, numba, pytest; mnn from the checkout, nothing installed).
Its stages, each in its own process with its own time limit, write into
``OUT_DIR``:

1. ``environment.json``: Python, numpy, CuPy, PyTorch, the GPU;
2. ``tests.json``: ``tests/test_gpu.py`` and ``tests/test_strict_device.py``
   with ``MNN_DEVICE=gpu``: every layer's forward and backward on the device
   against its CPU result, every gradient check on the device, the range
   checks of token ids, a few GPT training steps;
3. ``steps.json``: training steps (forward, backward, clipping, AdamW) of the
   GPT of the CPU recipe (4 layers, 128 wide, T 64, batch 12) and of the GPU
   recipe's size (6 layers, 384 wide, T 256, batch 64), mnn on CuPy against
   PyTorch eager, float32 and bf16 (PyTorch under ``torch.autocast``, mnn
   with :mod:`mnn.precision`), from the same initial weights: ms per step
   (median) and the first losses of both;
4. ``recipe.json``: ``mnn train gpt --preset shakespeare-char`` for the time
   left (interrupted with SIGINT, which saves a checkpoint), its val curve.

``summary.json`` collects all four. ``--dry-run`` runs the same stages on
the CPU in seconds: tiny sizes, the strict stand-in (:mod:`mnn.strict`) for
the GPU and PyTorch on the CPU; a CI test runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # 8 minutes in all on the GPU machine
SHAPES = {  # name -> (n_layer, n_head, n_embd, block_size, batch_size)
    "gpt-cpu-recipe": (4, 4, 128, 64, 12),
    "gpt-gpu-recipe": (6, 6, 384, 256, 64),
}
DRY_SHAPES = {"gpt-tiny": (1, 2, 16, 8, 4)}
VOCAB = 65


def find_text(given: str | None) -> str | None:
    """The tiny-Shakespeare file: ``--data``, else a copy under ``shared/data`` beside or inside the checkout."""
    if given:
        return given
    for folder in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data", ROOT / "data"):
        if (folder / "tinyshakespeare.txt").is_file():
            return str(folder / "tinyshakespeare.txt")
    return None  # mnn's cache, else a download (no network on the GPU machine: then the stage says so)


def environment(device: str) -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "device": device}
    import numpy  # noqa: PLC0415

    info["numpy"] = numpy.__version__
    try:
        import torch  # noqa: PLC0415

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
    except ImportError as error:
        info["torch"] = f"absent ({error})"
    if device == "gpu":
        try:
            import cupy  # noqa: PLC0415

            info["cupy"] = cupy.__version__
            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except Exception as error:  # noqa: BLE001 - report, do not stop the check
            info["cupy"] = f"unusable ({error})"
    return info


def run_stage(name: str, command: list, env: dict, timeout: float) -> dict:
    """Run one stage in a subprocess; its outcome, time and the tail of its output."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        code, out = "timeout", (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(errors="replace")
    return {"stage": name, "returncode": code, "seconds": round(time.perf_counter() - started, 1), "tail": out[-4000:]}


# -- stage 3: training steps, mnn against PyTorch ---------------------------------------------------
def mnn_steps(shape, dtype: str, device: str, warmup: int, steps: int) -> dict:
    import numpy  # noqa: PLC0415

    from mnn import backend  # noqa: PLC0415
    from mnn.backend import asarray, to_numpy  # noqa: PLC0415
    from mnn.losses import CrossEntropyLoss  # noqa: PLC0415
    from mnn.models.gpt import GPT, GPTConfig  # noqa: PLC0415
    from mnn.optim import AdamW, clip_grad_norm, param_groups  # noqa: PLC0415

    backend.use(device)
    n_layer, n_head, n_embd, T, B = shape
    model = GPT(GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=False),
                seed=0)
    initial = {k: numpy.array(to_numpy(v)) for k, v in model.state_dict().items()}
    if dtype != "float32":
        try:
            from mnn import precision  # noqa: PLC0415
        except ImportError:
            return {"status": "mnn has no mixed precision yet (mnn.precision)", "initial": initial}
        precision.set_compute_dtype(dtype)
    optimizer, loss_fn = AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99)), CrossEntropyLoss()
    sync = (lambda: __import__("cupy").cuda.Device().synchronize()) if device == "gpu" else (lambda: None)
    rng = numpy.random.default_rng(0)
    batches = [(rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T))) for _ in range(warmup + steps)]
    times, losses = [], []
    try:
        for x, y in batches:
            sync()
            started = time.perf_counter()
            model.zero_grad()
            loss = loss_fn.forward(model.forward(asarray(x)), asarray(y))
            model.backward(loss_fn.backward())
            clip_grad_norm(model.named_grads(), 1.0)
            optimizer.step()
            losses.append(float(loss))  # the step's one read-back, as in training
            sync()
            times.append((time.perf_counter() - started) * 1e3)
    finally:
        if dtype != "float32":
            precision.set_compute_dtype("float32")
    return {"status": "ok", "ms_per_step": round(statistics.median(times[warmup:]), 3),
            "losses": [round(v, 6) for v in losses[:3]], "initial": initial}


def torch_steps(shape, dtype: str, device: str, warmup: int, steps: int, initial: dict) -> dict:
    import numpy  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from benchmarks.torch_models import GPT, param_groups  # noqa: PLC0415

    target = "cuda" if device == "gpu" else "cpu"
    n_layer, n_head, n_embd, T, B = shape
    config = SimpleNamespace(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=T, vocab_size=VOCAB,
                             bias=False, dropout=0.0)
    torch.manual_seed(0)
    with torch.device(target):
        model = GPT(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in initial.items()})
    model.to(target)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99))
    sync = torch.cuda.synchronize if target == "cuda" else (lambda: None)
    rng = numpy.random.default_rng(0)
    batches = [(rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T))) for _ in range(warmup + steps)]
    times, losses = [], []
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    scaler = torch.amp.GradScaler(target) if dtype == "fp16" else None
    with torch.device(target):
        for x, y in batches:
            sync()
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            idx, targets = torch.from_numpy(x).to(target), torch.from_numpy(y).to(target)
            with torch.autocast(target, dtype=low, enabled=low is not None):
                logits, _ = model(idx)
                loss = torch.nn.functional.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1))
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            losses.append(float(loss))
            sync()
            times.append((time.perf_counter() - started) * 1e3)
    return {"status": "ok", "ms_per_step": round(statistics.median(times[warmup:]), 3),
            "losses": [round(v, 6) for v in losses[:3]]}


def steps_stage(args) -> dict:
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    warmup, steps = (1, 2) if args.dry_run else (3, 10)
    rows = []
    for name, shape in shapes.items():
        for dtype in ("float32", "bf16"):
            row = {"model": name, "shape": dict(zip(["n_layer", "n_head", "n_embd", "block_size", "batch_size"],
                                                   shape)), "dtype": dtype}
            try:
                mnn = mnn_steps(shape, dtype, args.device, warmup, steps)
                initial = mnn.pop("initial")
                row["mnn"] = mnn
                row["torch"] = torch_steps(shape, dtype, args.device, warmup, steps, initial)
                if mnn["status"] == "ok" and row["torch"]["status"] == "ok":
                    row["mnn_over_torch"] = round(mnn["ms_per_step"] / row["torch"]["ms_per_step"], 3)
                    row["first_loss_difference"] = abs(mnn["losses"][0] - row["torch"]["losses"][0])
            except Exception as error:  # noqa: BLE001 - one failing case must not lose the others
                row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"warmup": warmup, "steps": steps, "rows": rows}


# -- stage 4: the GPU recipe for the time left -------------------------------------------------------
def recipe_stage(args, env: dict, seconds: float) -> dict:
    out = Path(args.out) / "recipe"
    command = [sys.executable, "-m", "mnn.cli", "train", "gpt", "--preset", "shakespeare-char", "--out", str(out)]
    if args.device == "gpu":
        command += ["--device", "gpu"]
    if args.dry_run:
        command += ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
                    "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--log-interval", "5"]
    text = find_text(args.data)
    if text:
        command += ["--data", text]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    interrupted = False
    try:
        output, _ = process.communicate(timeout=max(seconds, 1))
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # the loop saves a checkpoint and stops at the step boundary
        interrupted = True
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    history_file = out / "history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    curve = [{"iter": row["step"], "train": row.get("train"), "val": row["val"]} for row in history if "val" in row]
    steps = [row for row in history if "loss" in row]
    return {"command": " ".join(command), "returncode": process.returncode, "interrupted": interrupted,
            "seconds": round(time.perf_counter() - started, 1), "val_curve": curve,
            "last_iter": max((row["step"] for row in history), default=0),
            "best_val": min((row["val"] for row in curve), default=None), "target_val": 1.47,
            "loss_rows": steps[-5:], "tail": output[-3000:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the folder the JSON results are written into")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (strict stand-in), in seconds")
    parser.add_argument("--data", help="tiny Shakespeare (default: shared/data/tinyshakespeare.txt if present)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check (default: 480)")
    parser.add_argument("--stage", choices=["steps"], help=argparse.SUPPRESS)  # run inside a stage's process
    args = parser.parse_args(argv)
    args.device = "strict" if args.dry_run else "gpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage == "steps":
        (out / "steps.json").write_text(json.dumps(steps_stage(args), indent=1) + "\n")
        return 0

    deadline = time.perf_counter() + args.budget - 15  # a margin to write the results
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MNN_DEVICE": args.device}
    summary = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    summary["environment"] = environment(args.device)
    (out / "environment.json").write_text(json.dumps(summary["environment"], indent=1) + "\n")

    tests = run_stage("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                      env, timeout=min(150, deadline - time.perf_counter()))
    summary["tests"] = tests
    (out / "tests.json").write_text(json.dumps(tests, indent=1) + "\n")

    stage = run_stage("steps", [sys.executable, str(Path(__file__).resolve()), str(out), "--stage", "steps"]
                      + (["--dry-run"] if args.dry_run else []), env, timeout=min(180, deadline - time.perf_counter()))
    steps_file = out / "steps.json"
    summary["steps"] = {**stage, **(json.loads(steps_file.read_text()) if steps_file.is_file() else {})}
    steps_file.write_text(json.dumps(summary["steps"], indent=1) + "\n")

    summary["recipe"] = recipe_stage(args, env, deadline - time.perf_counter())
    (out / "recipe.json").write_text(json.dumps(summary["recipe"], indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    ok = tests["returncode"] == 0 and stage["returncode"] == 0 and summary["recipe"]["val_curve"]
    print(json.dumps({"tests": tests["returncode"], "steps": [
        {k: row.get(k) for k in ("model", "dtype", "mnn_over_torch", "first_loss_difference", "error")}
        for row in summary["steps"].get("rows", [])], "recipe_best_val": summary["recipe"]["best_val"],
        "recipe_last_iter": summary["recipe"]["last_iter"]}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
