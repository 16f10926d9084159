"""The benchmark cases: the same work written three ways, in mnn, in PyTorch and as bare matrix products.

Each case builds, for one framework, a :class:`Side`: a ``step()`` closure doing
one unit of timed work and a ``loss(result)`` function turning what ``step``
returned into a number (called outside the timing, on the first step only, to
check that mnn and PyTorch computed the same thing). Both frameworks start
from the same weights (a numpy state dict made by :meth:`Case.prepare`, loaded
by each) and see the same data.

The ``"floor"`` side runs only the matrix products of the same step, with the
same shapes and the same count, as ``numpy.matmul`` into preallocated outputs:
the time no numpy implementation of that step can beat on this BLAS.

PyTorch is imported only when a PyTorch side is built, so a memory probe of
mnn does not load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy

MLP_SIZES = (784, 256, 10)
MLP_LR, MLP_MOMENTUM = 0.1, 0.9
# nanoGPT's README recipe for a CPU (with mnn's recipe defaults: bias on, dropout 0).
GPT_CPU = {"block_size": 64, "vocab_size": 65, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0, "bias": True}
GPT_BATCH = 12
# nanoGPT's GPU config (config/train_shakespeare_char.py: 6 layers, 6 heads, 384, T 256, no bias), dropout 0.
GPT_LARGE = {"block_size": 256, "vocab_size": 65, "n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.0,
             "bias": False}
GPT_LARGE_BATCH = 8
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1}
GRAD_CLIP = 1.0


@dataclass
class Side:
    """One framework's version of a case: ``step()`` is timed; ``loss(step())`` checks it (untimed)."""

    step: Callable[[], object]
    loss: Callable[[object], float] | None = None
    keep: list = field(default_factory=list)  # objects the closures need alive
    flops: float | None = None  # the floor's: its matrix products' floating-point operations per step


def cross_entropy(logits_row, target: int) -> float:
    """Cross-entropy of one row of logits (any framework, via numpy float64) against one class."""
    row = numpy.asarray(logits_row, dtype=numpy.float64).reshape(-1)
    top = row.max()
    return float(top + numpy.log(numpy.exp(row - top).sum()) - row[target])


# -- the floor: matrix products alone ----------------------------------------------
def gemm(m: int, k: int, n: int, batch: int | None = None, transpose_a: bool = False,
         transpose_b: bool = False, rng=None):
    """Operands ``a (m, k)``, ``b (k, n)`` (stacked ``batch`` times) and the output, float32.

    A transposed operand is a transposed view of a contiguous array, as the
    library code multiplies (``x @ W.T``, ``dY.T @ X``).
    """
    rng = rng if rng is not None else numpy.random.default_rng(0)
    lead = () if batch is None else (batch,)

    def operand(rows, cols, transposed):
        if transposed:
            return numpy.swapaxes(rng.standard_normal(lead + (cols, rows), dtype=numpy.float32), -1, -2)
        return rng.standard_normal(lead + (rows, cols), dtype=numpy.float32)

    return operand(m, k, transpose_a), operand(k, n, transpose_b), numpy.empty(lead + (m, n), dtype=numpy.float32)


def linear_gemms(rows: int, fan_in: int, fan_out: int, backward: bool = True, input_grad: bool = True) -> list:
    """``Y = X W^T``; backward ``dW = dY^T X`` and (if ``input_grad``) ``dX = dY W``."""
    products = [gemm(rows, fan_in, fan_out, transpose_b=True)]
    if backward:
        products.append(gemm(fan_out, rows, fan_in, transpose_a=True))
        if input_grad:
            products.append(gemm(rows, fan_out, fan_in))
    return products


def attention_gemms(batch: int, queries: int, keys: int, head_size: int, backward: bool = True) -> list:
    """``S = Q K^T``, ``Y = A V``; backward ``dA = G V^T``, ``dV = A^T G``, ``dQ = dS K``, ``dK = dS^T Q``."""
    products = [gemm(queries, head_size, keys, batch, transpose_b=True), gemm(queries, keys, head_size, batch)]
    if backward:
        products += [gemm(queries, head_size, keys, batch, transpose_b=True),
                     gemm(keys, queries, head_size, batch, transpose_a=True),
                     gemm(queries, keys, head_size, batch),
                     gemm(keys, queries, head_size, batch, transpose_a=True)]
    return products


def gpt_gemms(B: int, T: int, backward: bool, keys: int | None = None, config: dict = GPT_CPU) -> list:
    """Every matrix product of one GPT forward (and backward) at ``(B, T)`` with ``keys`` attended positions."""
    c = config
    C, NH, V = c["n_embd"], c["n_head"], c["vocab_size"]
    N, keys = B * T, keys or T
    products = []
    for _ in range(c["n_layer"]):
        products += linear_gemms(N, C, 3 * C, backward)
        products += attention_gemms(B * NH, T, keys, C // NH, backward)
        products += linear_gemms(N, C, C, backward)
        products += linear_gemms(N, C, 4 * C, backward)
        products += linear_gemms(N, 4 * C, C, backward)
    products += linear_gemms(N, C, V, backward)
    return products


def floor_side(products: list) -> Side:
    def step():
        for a, b, out in products:
            numpy.matmul(a, b, out=out)
        return None

    flops = sum(2.0 * out.size * a.shape[-1] for a, _, out in products)  # a multiply and an add per term
    return Side(step, None, [products], flops)


def replica_floor(case, state, data, count: int) -> Side:
    """The floor of a case whose mnn side runs ``count`` replicas on MKL (:mod:`mnn.blas`), as they run: each of
    ``count`` threads multiplies the products of its share of the batch, each product on one thread."""
    import copy  # noqa: PLC0415
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    from mnn import blas  # noqa: PLC0415

    shares = []
    for rows in numpy.array_split(numpy.arange(case.batch), count):
        share = copy.copy(case)
        share.batch = len(rows)
        shares.append(share.build_floor(state, data))
    parts = [share.keep[0] for share in shares]
    pool = ThreadPoolExecutor(count - 1)
    threadpool_limits(1)  # numpy's own products (those too small for MKL's path) on one thread each, too

    def run(part):
        for a, b, out in part:
            blas.matmul(a, b, out=out)

    def step():
        with blas.limit(1):
            futures = [pool.submit(run, part) for part in parts[1:]]
            run(parts[0])
            for future in futures:
                future.result()
        return None

    return Side(step, None, [parts, pool], sum(share.flops for share in shares))


# -- the cases ---------------------------------------------------------------------
class Case:
    """A benchmark case: ``prepare()`` makes the shared weights and data, ``build()`` one side."""

    name = ""
    description = ""
    unit = "step"  # what one reported time is for
    units_per_step = 1  # how many units one timed step holds (tokens for generation)
    training = True
    extra_sides: tuple = ()  # sides beyond mnn, torch and floor (PyTorch compiled, for the GPT)
    replicas = 1  # mnn's side's DataParallel replicas (with more than one, its floor multiplies as they do)

    def prepare(self) -> tuple[dict, dict]:
        raise NotImplementedError

    def build(self, framework: str, state: dict, data: dict) -> Side:
        if framework == "floor" and self.replicas > 1:
            from mnn import blas  # noqa: PLC0415

            if blas.library() == "mkl":  # the floor multiplies as mnn's replicas do, one thread each
                return replica_floor(self, state, data, self.replicas)
        return getattr(self, f"build_{framework}")(state, data)


class MLPStep(Case):
    """MLP 784-256-10: forward, softmax cross-entropy, backward, SGD momentum step."""

    unit = "step"

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.name = f"mlp_train_b{batch}"
        self.description = f"MLP 784-256-10 training step, batch {batch} (SGD momentum)"

    def prepare(self):
        from mnn.models import MLP  # noqa: PLC0415

        model = MLP(MLP_SIZES[0], (MLP_SIZES[1],), MLP_SIZES[2], seed=0)
        state = {name: numpy.array(value, copy=True) for name, value in model.state_dict().items()}
        rng = numpy.random.default_rng(1)
        data = {"x": rng.random((self.batch, MLP_SIZES[0]), dtype=numpy.float32),  # pixels in [0, 1)
                "y": rng.integers(0, MLP_SIZES[2], self.batch)}
        return state, data

    def build_mnn(self, state, data):
        from mnn.losses import CrossEntropyLoss  # noqa: PLC0415
        from mnn.models import MLP  # noqa: PLC0415
        from mnn.optim import SGD  # noqa: PLC0415

        model = MLP(MLP_SIZES[0], (MLP_SIZES[1],), MLP_SIZES[2], seed=0)
        model.load_state_dict(state)
        model.flatten_parameters()  # as ClassifierTask does, before its optimizer
        assert not model[0].input_grad  # MLP skips the data's gradient, as autograd does
        loss_fn = CrossEntropyLoss()
        optimizer = SGD(model, lr=MLP_LR, momentum=MLP_MOMENTUM)
        x, y = data["x"], data["y"]

        def step():  # the training loop's body: the update zeroes the gradients it reads
            loss = loss_fn.forward(model.forward(x), y)
            model.backward(loss_fn.backward())
            optimizer.step(zero_grad=True)
            return loss

        return Side(step, float, [model, optimizer])

    def build_torch(self, state, data):
        import torch  # noqa: PLC0415

        from benchmarks.torch_models import mlp  # noqa: PLC0415

        model = mlp(*MLP_SIZES)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
        optimizer = torch.optim.SGD(model.parameters(), lr=MLP_LR, momentum=MLP_MOMENTUM)
        x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])

        def step():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            return loss

        return Side(step, lambda loss: float(loss.item()), [model, optimizer])

    def build_floor(self, state, data):
        n_in, hidden, n_out = MLP_SIZES
        # No input gradient for the first layer: nothing uses the gradient of the data.
        return floor_side(linear_gemms(self.batch, n_in, hidden, input_grad=False)
                          + linear_gemms(self.batch, hidden, n_out))


def gpt_state(config: dict = GPT_CPU) -> dict:
    from mnn.models.gpt import GPT, GPTConfig  # noqa: PLC0415

    model = GPT(GPTConfig(**config), seed=0)
    return {name: numpy.array(value, copy=True) for name, value in model.state_dict().items()}


def mnn_gpt(state, config: dict = GPT_CPU):
    from mnn.models.gpt import GPT, GPTConfig  # noqa: PLC0415

    model = GPT(GPTConfig(**config), seed=0)
    model.load_state_dict(state)
    return model


def torch_gpt(state, config: dict = GPT_CPU):
    import torch  # noqa: PLC0415

    from benchmarks.torch_models import GPT  # noqa: PLC0415
    from mnn.models.gpt import GPTConfig  # noqa: PLC0415

    model = GPT(GPTConfig(**config))
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    return model


def mnn_language_model_side(model, replicas: int, adamw: dict, data: dict) -> Side:
    """The loop body of :mod:`mnn.train.language_model`: ``replicas`` threads, clip 1.0, AdamW ``adamw``."""
    from mnn.losses import CrossEntropyLoss  # noqa: PLC0415
    from mnn.optim import AdamW, clip_grad_norm, param_groups  # noqa: PLC0415
    from mnn.parallel import DataParallel  # noqa: PLC0415

    model.flatten_parameters()  # as the language-model loop does, before its optimizer and replicas
    parallel = DataParallel(model, CrossEntropyLoss(), replicas)  # as the language-model loop runs it
    optimizer = AdamW(param_groups(model, adamw["weight_decay"]), lr=adamw["lr"], betas=adamw["betas"])
    grads = [grad for _, grad in model.named_grads()]
    x, y = data["x"], data["y"]

    def step():  # the update zeroes the gradients it reads, as the loop's does
        loss = parallel.forward_backward(x, y)
        clip_grad_norm(grads, GRAD_CLIP)
        optimizer.step(zero_grad=True)
        return loss

    return Side(step, float, [model, optimizer, parallel])


def torch_language_model_side(model, logits_of, optimizer, data: dict) -> Side:
    """The loop body of nanoGPT's train.py (no AMP, no compile): ``logits_of(x)``, clip 1.0, ``optimizer``."""
    import torch  # noqa: PLC0415

    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])

    def step():
        logits = logits_of(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        return loss

    return Side(step, lambda loss: float(loss.item()), [model, optimizer])


class GPTStep(Case):
    """A nanoGPT config's training step: forward, cross-entropy, backward, clip_grad_norm 1.0, AdamW step.

    Besides PyTorch eager, a ``torch_compile`` side: the same model through
    ``torch.compile`` (inductor, CPU) with the fused AdamW, as a PyTorch user
    tunes a CPU run; its first step compiles, and that time is reported apart.
    """

    extra_sides = ("torch_compile",)

    def __init__(self, config: dict = GPT_CPU, batch: int = GPT_BATCH, name: str = "gpt_train",
                 label: str = "nanoGPT CPU config") -> None:
        from mnn.train.language_model import GPTTrainConfig  # noqa: PLC0415

        self.config, self.batch, self.name = config, batch, name
        self.replicas = GPTTrainConfig.replicas  # as the language-model loop runs it
        c = config
        self.description = (f"GPT training step, {label} (B {batch}, T {c['block_size']}, {c['n_layer']} layers, "
                            f"{c['n_head']} heads, C {c['n_embd']}, V {c['vocab_size']})")

    def prepare(self):
        rng = numpy.random.default_rng(2)
        tokens = rng.integers(0, self.config["vocab_size"], (self.batch, self.config["block_size"] + 1))
        return gpt_state(self.config), {"x": tokens[:, :-1].copy(), "y": tokens[:, 1:].copy()}

    def build_mnn(self, state, data):
        from mnn.train.language_model import GPTTrainConfig  # noqa: PLC0415

        return mnn_language_model_side(mnn_gpt(state, self.config), GPTTrainConfig.replicas, ADAMW, data)

    def build_torch(self, state, data, compiled: bool = False):
        import torch  # noqa: PLC0415

        from benchmarks.torch_models import param_groups  # noqa: PLC0415

        model = torch_gpt(state, self.config)
        optimizer = torch.optim.AdamW(param_groups(model, ADAMW["weight_decay"]), lr=ADAMW["lr"],
                                      betas=ADAMW["betas"], fused=compiled or None)
        forward = torch.compile(model) if compiled else model
        return torch_language_model_side(model, lambda x: forward(x)[0], optimizer, data)

    def build_torch_compile(self, state, data):
        return self.build_torch(state, data, compiled=True)

    def build_floor(self, state, data):
        return floor_side(gpt_gemms(self.batch, self.config["block_size"], backward=True, config=self.config))


class GPTGenerate(Case):
    """Batch-1 generation: ``tokens`` (63) tokens after a 1-token prompt, one forward each, teacher-forced.

    The tokens fed are fixed (not sampled), so both frameworks do exactly the
    same work; the greedy ``argmax`` of each step stands for sampling. The
    check value is the cross-entropy of the last step's logits.
    """

    training = False
    unit = "token"

    def __init__(self, cached: bool, tokens: int = GPT_CPU["block_size"] - 1) -> None:
        if not 1 <= tokens < GPT_CPU["block_size"]:
            raise ValueError(f"GPTGenerate: tokens must be in [1, {GPT_CPU['block_size']}), got {tokens}")
        self.cached = cached
        self.name = "gpt_generate_kv_cache" if cached else "gpt_generate_no_cache"
        self.description = (f"GPT generation at batch 1, {tokens} tokens, per token, " +
                            ("with a key/value cache" if cached else "full context each token (no cache)"))
        self.units_per_step = tokens

    def prepare(self):
        rng = numpy.random.default_rng(3)
        return gpt_state(), {"ids": rng.integers(0, GPT_CPU["vocab_size"], (1, GPT_CPU["block_size"]))}

    def build_mnn(self, state, data):
        from mnn import no_grad  # noqa: PLC0415

        model = mnn_gpt(state).eval()
        ids, n = data["ids"], self.units_per_step

        @no_grad()  # as PyTorch's side runs under inference_mode
        def step():
            if self.cached:
                logits, past = model.forward_cached(ids[:, :1])
                for t in range(1, n):
                    logits[:, -1].argmax(-1)
                    logits, past = model.forward_cached(ids[:, t:t + 1], past)
            else:
                for t in range(1, n + 1):
                    logits = model.forward(ids[:, :t])
                    logits[:, -1].argmax(-1)
            return logits[0, -1]

        return Side(step, lambda row: cross_entropy(row, int(ids[0, n])), [model])

    def build_torch(self, state, data):
        import torch  # noqa: PLC0415

        model = torch_gpt(state).eval()
        ids, n = torch.from_numpy(data["ids"]), self.units_per_step
        target = int(data["ids"][0, n])

        @torch.inference_mode()
        def step():
            if self.cached:
                logits, past = model(ids[:, :1])
                for t in range(1, n):
                    logits[:, -1].argmax(-1)
                    logits, past = model(ids[:, t:t + 1], past)
            else:
                for t in range(1, n + 1):
                    logits, _ = model(ids[:, :t])
                    logits[:, -1].argmax(-1)
            return logits[0, -1]

        return Side(step, lambda row: cross_entropy(row.numpy(), target), [model])

    def build_floor(self, state, data):
        n = self.units_per_step
        if self.cached:
            products = [p for t in range(1, n + 1) for p in gpt_gemms(1, 1, backward=False, keys=t)]
        else:
            products = [p for t in range(1, n + 1) for p in gpt_gemms(1, t, backward=False)]
        return floor_side(products)


def all_cases(generated_tokens: int = GPT_CPU["block_size"] - 1) -> list[Case]:
    """Every case; ``generated_tokens`` per timed generation step (fewer for a quick run)."""
    from benchmarks.cases_conv_rnn import conv_rnn_cases  # noqa: PLC0415 - it imports this module

    return [MLPStep(64), MLPStep(512), GPTStep(),
            GPTStep(GPT_LARGE, GPT_LARGE_BATCH, "gpt_large_train", "nanoGPT GPU config on the CPU"),
            GPTGenerate(cached=False, tokens=generated_tokens), GPTGenerate(cached=True, tokens=generated_tokens),
            *conv_rnn_cases()]
