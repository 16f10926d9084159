"""The whole recipe, not one step: nanoGPT's CPU Shakespeare run in mnn and in PyTorch, wall time and val loss.

``python -m benchmarks.recipe`` trains ``--preset shakespeare-char-cpu``
(block 64, batch 12, 4 layers, 4 heads, 128 embedding, 2000 iterations,
AdamW 0.9/0.99, weight decay 0.1 on matrices, warm-up 100 then cosine
1e-3 -> 1e-4, clipping at 1.0, evaluation every 250 iterations over 200
batches) twice on the same machine with the same thread count: once with
``mnn.train_gpt.train_gpt`` and once with the same loop written in PyTorch
over the benchmark's nanoGPT model, on identical batches (the same tokenizer,
split and seeded window sampler). It records each side's wall time (training
and evaluation, as a user waits for them) and best val loss in
``benchmarks/recipe.json``. Each side runs in a fresh Python process of its
own (one framework's idle worker threads slow the other's down when both
live in one process on 2 cores); the two runs cannot be interleaved, so run
it on a quiet machine; ``--order`` says which goes first.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy
import torch
from threadpoolctl import threadpool_limits

from benchmarks import torch_models
from mnn.data import random_windows, tiny_shakespeare_path
from mnn.gpt import GPT, GPTConfig
from mnn.schedules import WarmupCosine
from mnn.train_gpt import PRESETS, GPTTrainConfig, prepare_text, train_gpt


def run_torch(config: GPTTrainConfig) -> dict:
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
    for it in range(config.max_iters + 1):
        if it % config.eval_interval == 0 or it == config.max_iters:
            losses = estimate_loss()
            evaluations.append({"step": it, **losses})
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
    return {"seconds": time.perf_counter() - started, "best_val": best_val, "evaluations": evaluations}


def run_mnn(config: GPTTrainConfig) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = train_gpt(replace(config, out=out))
        history = json.loads((Path(out) / "history.json").read_text())
    evaluations = [{"step": row["step"], "train": row["train"], "val": row["val"]} for row in history if "val" in row]
    return {"seconds": time.perf_counter() - started, "best_val": result["best_val"], "evaluations": evaluations}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="tiny Shakespeare (default: ../shared/data/tinyshakespeare.txt if present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-iters", type=int, help="shorten the recipe (for a smoke test)")
    parser.add_argument("--eval-iters", type=int)
    parser.add_argument("--order", choices=["mnn-first", "torch-first"], default="torch-first")
    parser.add_argument("--out", default=str(Path(__file__).with_name("recipe.json")))
    parser.add_argument("--side", choices=["mnn", "torch"], help=argparse.SUPPRESS)  # one side, in a child process
    args = parser.parse_args(argv)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    config = GPTTrainConfig(**PRESETS["shakespeare-char-cpu"], data=args.data or (str(shared) if shared.exists() else None))
    if args.max_iters:
        config = replace(config, max_iters=args.max_iters, eval_interval=max(1, args.max_iters // 2))
    if args.eval_iters:
        config = replace(config, eval_iters=args.eval_iters)
    if args.side:
        torch.set_num_threads(args.threads)
        with threadpool_limits(args.threads):
            result = (run_torch if args.side == "torch" else run_mnn)(config)
        Path(args.out).write_text(json.dumps(result))
        return result

    runs = {}
    for side in (["torch", "mnn"] if args.order == "torch-first" else ["mnn", "torch"]):
        child = [sys.executable, "-m", "benchmarks.recipe", "--side", side, "--threads", str(args.threads),
                 "--out", args.out + f".{side}"]
        if args.data:
            child += ["--data", args.data]
        if args.max_iters:
            child += ["--max-iters", str(args.max_iters)]
        if args.eval_iters:
            child += ["--eval-iters", str(args.eval_iters)]
        subprocess.run(child, check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
        side_file = Path(args.out + f".{side}")
        runs[side] = json.loads(side_file.read_text())
        side_file.unlink()
        print(f"{side}: {runs[side]['seconds']:.1f} s, best val {runs[side]['best_val']:.4f}", flush=True)
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m benchmarks.recipe",
        "threads": args.threads, "cores": __import__("os").cpu_count(),
        "numpy": numpy.__version__, "torch": torch.__version__,
        "config": asdict(config),
        "runs": runs,
        "ratio": {"mnn/torch seconds": runs["mnn"]["seconds"] / runs["torch"]["seconds"]},
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"mnn/torch wall time {report['ratio']['mnn/torch seconds']:.2f}; written {args.out}")
    return report


if __name__ == "__main__":
    main()
