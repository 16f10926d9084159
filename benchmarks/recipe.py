"""The whole recipe, not one step: nanoGPT's CPU Shakespeare run in mnn and in PyTorch, wall time and val loss.

``python -m benchmarks.recipe`` trains ``--preset shakespeare-char-cpu``
(block 64, batch 12, 4 layers, 4 heads, 128 embedding, 2000 iterations,
AdamW 0.9/0.99, weight decay 0.1 on matrices, warm-up 100 then cosine
1e-3 -> 1e-4, clipping at 1.0, evaluation every 250 iterations over 200
batches) twice on the same machine with the same thread count: once with
``mnn.train.language_model.train_gpt`` and once with the same loop written in PyTorch
over the benchmark's nanoGPT model, on identical batches (the same tokenizer,
split and seeded window sampler). It records each side's wall time (training and evaluation, as a user waits
for them: data preparation, every step and every evaluation) and best val
loss in ``benchmarks/recipe.json``. Both save a checkpoint after an
evaluation that improved val (the PyTorch loop with ``torch.save``, as
nanoGPT's ``train.py`` does; ``train_gpt`` after every evaluation, with the
best weights beside it); ``train_gpt`` also writes its history and loss plot
at the end (about 1 s, matplotlib's import included), which the PyTorch
loop does not.

The two runs take turns: each framework runs in a worker process of its own
(:mod:`benchmarks.workers` says why), and the parent lets one side run its
next ``--block`` iterations (50: about 2 s, plus an evaluation every fifth
block) while the other waits, in the order A B B A, with a pause between
blocks for the last side's spinning threads to park. A side's wall time is
the sum of its blocks, so a slow spell on the shared machine falls on both
sides alike instead of on whichever ran then. PyTorch runs with glibc's
default malloc settings, as its users run it; ``--torch-malloc mnn`` gives it
the settings mnn makes when imported (which speed PyTorch up too).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy
import torch
from threadpoolctl import threadpool_limits

from benchmarks import kernel, torch_models
from benchmarks.workers import Channel, Worker, in_turns, side_environment
from mnn.data import random_windows, tiny_shakespeare_path
from mnn.models.gpt import GPT, GPTConfig
from mnn.optim.schedules import WarmupCosine
from mnn.train.language_model import PRESETS, GPTTrainConfig, prepare_text, train_gpt


SETTLE_SECONDS = 0.25  # between turns, for the last side's spinning BLAS/OpenMP threads to park


def run_torch(config: GPTTrainConfig, on_iteration=None) -> dict:
    """The recipe in PyTorch, batch for batch the one ``train_gpt`` runs; returns wall time and losses."""
    started = time.perf_counter()
    tokenizer, train_ids, val_ids = prepare_text(tiny_shakespeare_path(config.data))
    model_config = GPTConfig(config.block_size, tokenizer.vocab_size, config.n_layer, config.n_head,
                             config.n_embd, config.dropout, config.bias)
    model = torch_models.GPT(model_config)
    mnn_model = GPT(model_config, seed=config.seed)  # the same initial weights as the mnn run
    model.load_state_dict({k: torch.from_numpy(numpy.array(v)) for k, v in mnn_model.state_dict().items()})
    optimizer = torch.optim.AdamW(torch_models.param_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=(config.beta1, config.beta2))
    schedule = WarmupCosine(config.learning_rate, config.min_lr, config.warmup_iters,
                            config.lr_decay_iters or config.max_iters)
    batch_rng = numpy.random.default_rng([config.seed, 1])
    eval_rng = numpy.random.default_rng([config.seed, 2])

    def batch(ids, rng):
        x, y = random_windows(ids, config.block_size, config.batch_size, rng)
        return torch.from_numpy(x), torch.from_numpy(y)

    @torch.no_grad()
    def estimate_loss() -> dict:
        model.eval()
        losses = {}
        for name, ids in [("train", train_ids), ("val", val_ids)]:
            total = 0.0
            for _ in range(config.eval_iters):
                x, y = batch(ids, eval_rng)
                logits, _ = model(x)
                total += torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item()
            losses[name] = total / config.eval_iters
        model.train()
        return losses

    best_val, evaluations = math.inf, []
    checkpoints = tempfile.TemporaryDirectory()
    for it in range(config.max_iters + 1):
        if on_iteration is not None:
            on_iteration(it)
        if it % config.eval_interval == 0 or it == config.max_iters:
            losses = estimate_loss()
            evaluations.append({"step": it, **losses})
            if losses["val"] < best_val:  # nanoGPT's train.py saves a checkpoint then, as train_gpt does
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": it,
                            "best_val_loss": losses["val"], "config": asdict(config)},
                           Path(checkpoints.name) / "ckpt.pt")
            best_val = min(best_val, losses["val"])
        if it == config.max_iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = schedule(it)
        x, y = batch(train_ids, batch_rng)
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
    checkpoints.cleanup()
    return {"seconds": time.perf_counter() - started, "best_val": best_val, "evaluations": evaluations}


def run_mnn(config: GPTTrainConfig, on_iteration=None) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = train_gpt(replace(config, out=out), on_iteration=on_iteration)
        history = json.loads((Path(out) / "history.json").read_text())
    evaluations = [{"step": row["step"], "train": row["train"], "val": row["val"]} for row in history if "val" in row]
    return {"seconds": time.perf_counter() - started, "best_val": result["best_val"], "evaluations": evaluations}


class Turns:
    """In a side's worker: run until the next block boundary, report the block's seconds, wait for the next go."""

    def __init__(self, channel: Channel, every: int) -> None:
        self.channel, self.every, self.started = channel, every, 0.0

    def go(self) -> None:
        if self.channel.receive() is None:
            raise SystemExit(0)  # the parent has gone
        self.started = time.perf_counter()

    def report(self, iteration: int, result: dict | None = None) -> None:
        self.channel.send({"iteration": iteration, "seconds": time.perf_counter() - self.started, "result": result})

    def __call__(self, it: int) -> None:  # the on_iteration hook
        if it and it % self.every == 0:
            self.report(it)
            self.go()


def serve_side(side: str, config: GPTTrainConfig, threads: int, block: int) -> None:
    channel = Channel()
    torch.set_num_threads(threads)
    limiter = threadpool_limits(threads)
    from mnn.backend import MALLOC_RETAINS_FREED_MEMORY  # noqa: PLC0415

    channel.send({"side": side, "mnn_malloc_settings": MALLOC_RETAINS_FREED_MEMORY,
                  "blas": kernel.torch_blas() if side == "torch" else kernel.numpy_blas()})
    turns = Turns(channel, block)
    turns.go()
    result = (run_torch if side == "torch" else run_mnn)(config, turns)
    turns.report(config.max_iters, {**result, "mnn_malloc_settings": MALLOC_RETAINS_FREED_MEMORY,
                                    "blas_at_end": kernel.torch_blas() if side == "torch" else kernel.numpy_blas()})
    del limiter


def run_in_turns(config_args: list[str], threads: int, block: int, order: list[str], torch_malloc: str,
                 drop=(), mnn_blas: str | None = None) -> dict:
    """Both sides in worker processes, block by block in turns; ``{side: result}`` with summed ``seconds``.

    ``drop``: environment variables the workers run without (:func:`benchmarks.kernel.benchmark_environment`);
    ``mnn_blas``: ``MNN_BLAS`` for mnn's worker (:func:`benchmarks.kernel.mnn_library`).
    """
    workers, runs = {}, {}
    turns = {side: [] for side in order}  # seconds of each turn, in order: where the two sides differ
    try:
        for side in order:
            workers[side] = Worker("benchmarks.recipe", ["--side", side, "--threads", str(threads),
                                                         "--block", str(block), *config_args],
                                   side_environment(side, torch_malloc, drop, mnn_blas))

        def run_block(side: str) -> bool:
            time.sleep(SETTLE_SECONDS)
            reply = workers[side].call(go=True)
            turns[side].append(reply["seconds"])
            if reply["result"] is None:
                return False
            runs[side] = {**reply["result"], "seconds": sum(turns[side]), "turn_seconds": turns[side],
                          "blas": reply["result"].pop("blas_at_end")}  # what it multiplied with (MKL once used)
            print(f"{side}: {runs[side]['seconds']:.1f} s, best val {runs[side]['best_val']:.4f}", flush=True)
            return True

        in_turns(order, run_block)
    finally:
        for worker in workers.values():
            worker.close()
    return runs


def within(run: dict, seconds: float, block: int) -> dict:
    """The best val ``run`` had reached by ``seconds`` of its own turns (the other side's whole wall time).

    An evaluation at step ``s`` runs at the start of the turn that holds
    iterations ``s`` to ``s + block - 1``: it is counted done when that turn ends.
    """
    done = numpy.cumsum(run["turn_seconds"])
    reached = [e for e in run["evaluations"] if done[min(e["step"] // block, len(done) - 1)] <= seconds]
    best = min(reached, key=lambda e: e["val"]) if reached else None
    return {"seconds": seconds, "best_val": best["val"] if best else None, "at_step": best["step"] if best else None}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="tiny Shakespeare (default: ../shared/data/tinyshakespeare.txt if present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-iters", type=int, help="shorten the recipe (for a smoke test)")
    parser.add_argument("--eval-iters", type=int)
    parser.add_argument("--order", choices=["mnn-first", "torch-first"], default="torch-first",
                        help="which side runs the first block")
    parser.add_argument("--block", type=int, default=50, help="iterations per turn")
    parser.add_argument("--torch-malloc", choices=["default", "mnn"], default="default",
                        help="PyTorch with glibc's default malloc settings, or with the ones mnn sets")
    parser.add_argument("--out", default=str(Path(__file__).with_name("recipe.json")))
    parser.add_argument("--mnn-preset", choices=sorted(PRESETS), default="shakespeare-char-cpu",
                        help="mnn's preset (PyTorch always runs shakespeare-char-cpu): shakespeare-char-cpu-fast "
                             "asks what mnn reaches in PyTorch's wall time")
    parser.add_argument("--keep-blas-env", action="store_true",
                        help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE as set (see benchmarks.kernel)")
    parser.add_argument("--mnn-blas", choices=["auto", "numpy", "mkl"], default="auto",
                        help="mnn's BLAS (MNN_BLAS): auto takes MKL on an Intel CPU where it is installed")
    parser.add_argument("--side", choices=["mnn", "torch"], help=argparse.SUPPRESS)  # one side, in a worker process
    args = parser.parse_args(argv)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

    def recipe_config(preset: str) -> GPTTrainConfig:
        config = GPTTrainConfig(**PRESETS[preset], data=args.data or (str(shared) if shared.exists() else None))
        if args.max_iters:
            config = replace(config, max_iters=args.max_iters, eval_interval=max(1, args.max_iters // 2))
        if args.eval_iters:
            config = replace(config, eval_iters=args.eval_iters)
        return config

    config = recipe_config(args.mnn_preset if args.side == "mnn" else "shakespeare-char-cpu")
    if args.block < 1:
        parser.error(f"--block must be >= 1, got {args.block}")
    if args.side:
        serve_side(args.side, config, args.threads, args.block)
        return {}

    config_args = [f"--{name}={value}" for name, value in (("data", args.data), ("max-iters", args.max_iters),
                                                            ("eval-iters", args.eval_iters),
                                                            ("mnn-preset", args.mnn_preset)) if value]
    order = ["torch", "mnn"] if args.order == "torch-first" else ["mnn", "torch"]
    drop, blas_environment = kernel.benchmark_environment(keep=args.keep_blas_env)
    if blas_environment["message"]:
        print(blas_environment["message"], flush=True)
    mnn_blas, why = kernel.mnn_library(args.mnn_blas)
    print(f"mnn multiplies with {why}", flush=True)
    runs = run_in_turns(config_args, args.threads, args.block, order, args.torch_malloc, drop, mnn_blas)
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m benchmarks.recipe" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "method": f"in turns of {args.block} iterations, each side in its own process, A B B A; "
                  f"seconds = sum of a side's turns; PyTorch with {args.torch_malloc} malloc settings",
        "torch_malloc": args.torch_malloc,
        "threads": args.threads, "cores": __import__("os").cpu_count(), "cpu_model": kernel.cpu_model(),
        "blas_environment": blas_environment,
        "mnn_blas": {"library": mnn_blas, "why": why},
        "numpy": numpy.__version__, "torch": torch.__version__,
        "config": asdict(config),
        "mnn_preset": args.mnn_preset,
        "mnn_config": asdict(recipe_config(args.mnn_preset)),
        "mnn_in_torch_time": within(runs["mnn"], runs["torch"]["seconds"], args.block),
        "runs": runs,
        "ratio": {"mnn/torch seconds": runs["mnn"]["seconds"] / runs["torch"]["seconds"],
                  # each turn pair did the same work moments apart: the median is robust to a slow spell
                  "median over turns": statistics.median(
                      ours / theirs for ours, theirs in zip(runs["mnn"]["turn_seconds"], runs["torch"]["turn_seconds"]))},
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    reached = report["mnn_in_torch_time"]
    if reached["best_val"] is not None:
        print(f"mnn ({args.mnn_preset}) in PyTorch's {reached['seconds']:.1f} s: val {reached['best_val']:.4f} "
              f"at step {reached['at_step']}")
    print(f"mnn/torch wall time {report['ratio']['mnn/torch seconds']:.2f} "
          f"(median over turns {report['ratio']['median over turns']:.2f}); written {args.out}")
    return report


if __name__ == "__main__":
    main()
