"""The whole GPT against the same model written from scratch in PyTorch (llm.c's test_gpt2, failing loudly).

The PyTorch model below uses nanoGPT's module names, so mnn's ``state_dict()``
loads into it unchanged. Compared: the state-dict keys, logits, loss, the
gradient of every parameter, and the parameters after three AdamW steps with
gradient clipping, in float64 and float32.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mnn
from mnn.backend import to_numpy
from mnn.errors import InputError, ShapeError
from mnn.models.gpt import GPT, GPTConfig
from mnn.losses import CrossEntropyLoss
from mnn.optim import AdamW, clip_grad_norm, param_groups

TINY = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)


# -- the reference: GPT-2 in PyTorch, written independently of mnn --------------
class TorchLayerNorm(nn.Module):
    def __init__(self, dim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class TorchCausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        att = self.attn_dropout(F.softmax(att.masked_fill(future, float("-inf")), dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class TorchMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class TorchBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = TorchLayerNorm(config.n_embd, config.bias)
        self.attn = TorchCausalSelfAttention(config)
        self.ln_2 = TorchLayerNorm(config.n_embd, config.bias)
        self.mlp = TorchMLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([TorchBlock(config) for _ in range(config.n_layer)]),
            ln_f=TorchLayerNorm(config.n_embd, config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        t = self.transformer
        x = t.drop(t.wte(idx) + t.wpe(torch.arange(idx.shape[1])))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


def torch_copy(model: GPT, dtype) -> TorchGPT:
    """A TorchGPT holding exactly ``model``'s weights."""
    reference = TorchGPT(model.config).to(dtype)
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return reference


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b.detach().numpy() if isinstance(b, torch.Tensor) else b, dtype=np.float64).ravel()
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def batch(config, B=4, T=None, seed=1):
    rng = np.random.default_rng(seed)
    T = T or config.block_size
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


# -- structure -------------------------------------------------------------------
def test_state_dict_keys_equal_the_pytorch_model():
    model = GPT(TINY, dtype=np.float64)
    assert set(model.state_dict()) == set(TorchGPT(TINY).state_dict())
    for key, value in TorchGPT(TINY).state_dict().items():
        assert tuple(model.state_dict()[key].shape) == tuple(value.shape), key


def test_lm_head_is_tied_to_wte_array_and_gradient():
    model = GPT(TINY)
    wte = model.transformer.wte
    assert model.lm_head.params["weight"] is wte.params["weight"]
    assert model.lm_head.grads["weight"] is wte.grads["weight"]
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names


def test_gpt2_initialisation():
    config = GPTConfig(block_size=32, vocab_size=300, n_layer=8, n_head=2, n_embd=64)
    state = GPT(config, seed=3).state_dict()
    for name, value in state.items():
        value = np.asarray(value, dtype=np.float64)
        if name.endswith("c_proj.weight"):
            assert abs(value.std() / (0.02 / math.sqrt(2 * 8)) - 1) < 0.05, name
            assert abs(value.mean()) < 0.01 * 0.02, name
        elif value.ndim == 2:
            assert abs(value.std() / 0.02 - 1) < 0.05, name
            assert abs(value.mean()) < 0.05 * 0.02, name
        elif "ln_" in name and name.endswith(".weight"):
            assert np.all(value == 1), name
        else:
            assert np.all(value == 0), name


def test_bias_false_has_no_bias_parameters():
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8, bias=False)
    model = GPT(config)
    assert not any(name.endswith(".bias") for name in model.state_dict())
    assert set(model.state_dict()) == set(TorchGPT(config).state_dict())


def test_loss_at_init_is_log_vocab_size():
    model = GPT(TINY, seed=0)
    idx, targets = batch(TINY, B=8)
    loss = float(CrossEntropyLoss().forward(model.forward(idx), targets))
    assert abs(loss - math.log(TINY.vocab_size)) < 0.1


def test_sequence_longer_than_block_size_is_refused_naming_both():
    model = GPT(TINY)
    with pytest.raises(ShapeError, match=r"T=17.*block_size=16"):
        model.forward(np.zeros((1, 17), dtype=np.int64))


def test_bad_token_ids_are_refused():
    model = GPT(TINY)
    with pytest.raises(InputError, match="65"):  # on a device: at the next value read back
        to_numpy(model.forward(np.full((1, 4), 65)))
    with pytest.raises(ShapeError, match="integer"):
        model.forward(np.zeros((1, 4)))
    with pytest.raises(ShapeError, match=r"\(B, T\)"):
        model.forward(np.zeros(4, dtype=np.int64))


# -- parity with PyTorch: logits, loss, every gradient, three AdamW steps -----------
@pytest.mark.parametrize("np_dtype, torch_dtype, tol", [(np.float64, torch.float64, 1e-8),
                                                       (np.float32, torch.float32, 1e-4)])
def test_matches_pytorch_logits_loss_gradients_and_adamw_steps(np_dtype, torch_dtype, tol):
    model = GPT(TINY, seed=0, dtype=np_dtype)
    reference = torch_copy(model, torch_dtype)
    criterion = CrossEntropyLoss()
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    optimizer = AdamW(param_groups(model, weight_decay=0.1), weight_decay=0.1, **hyper)
    decay = [p for p in reference.parameters() if p.dim() >= 2]
    no_decay = [p for p in reference.parameters() if p.dim() < 2]
    torch_optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                         {"params": no_decay, "weight_decay": 0.0}], **hyper)
    torch_names = dict(reference.named_parameters())  # tied lm_head listed once, as wte

    for step in range(3):
        idx, targets = batch(TINY, seed=step)
        logits = model.forward(idx)
        loss = criterion.forward(logits, targets)
        model.zero_grad()
        model.backward(criterion.backward())

        torch_logits = reference(torch.from_numpy(idx))
        torch_loss = F.cross_entropy(torch_logits.view(-1, TINY.vocab_size), torch.from_numpy(targets).view(-1))
        torch_optimizer.zero_grad()
        torch_loss.backward()

        if step == 0:
            assert logits.dtype == np_dtype
            assert rel(logits, torch_logits) <= tol
            assert abs(float(loss) - torch_loss.item()) <= tol * abs(torch_loss.item())
            assert abs(float(loss) - math.log(TINY.vocab_size)) < 0.1
            grads = dict(model.named_grads())
            assert set(grads) == set(torch_names)
            for name, grad in grads.items():
                assert rel(grad, torch_names[name].grad) <= tol, name

        norm = clip_grad_norm(model.named_grads(), 1.0)
        torch_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0).item()
        assert abs(norm - torch_norm) <= tol * torch_norm
        optimizer.step()
        torch_optimizer.step()

    C = TINY.n_embd
    for name, param in model.named_parameters():
        expected = torch_names[name].detach().numpy()
        if name.endswith("attn.c_attn.bias"):
            # The key bias adds q.b_k to a whole row of scores, which the softmax
            # ignores: its gradient is exactly 0, in practice rounding noise
            # (~1e-11 in float32) that Adam divides by eps. Its drift is checked
            # absolutely; the query and value biases relatively, as the rest.
            key = slice(C, 2 * C)
            assert np.max(np.abs(param[key] - expected[key])) <= 1e-5, name
            param, expected = np.delete(param, np.arange(C, 2 * C)), np.delete(expected, np.arange(C, 2 * C))
        assert rel(param, expected) <= tol, name


def test_gradcheck_whole_model_with_dropout():
    config = GPTConfig(block_size=4, vocab_size=7, n_layer=1, n_head=2, n_embd=4, dropout=0.2)
    model = GPT(config, seed=0, dtype=np.float64)
    dropouts = [m for _, m in model.named_modules() if type(m).__name__ == "Dropout"]
    assert len(dropouts) == 4

    def reseed():
        for i, layer in enumerate(dropouts):
            layer.rng = np.random.default_rng(i)

    idx = np.array([[0, 3, 6, 2], [5, 5, 1, 4]])
    mnn.gradcheck(model, (idx,), before_forward=reseed)


def test_evaluation_mode_backpropagates_and_no_grad_keeps_nothing():
    """As in PyTorch: eval() turns dropout off but still backpropagates; no_grad() keeps nothing for a backward."""
    config = GPTConfig(block_size=4, vocab_size=7, n_layer=1, n_head=2, n_embd=4, dropout=0.2)
    model = GPT(config, seed=0, dtype=np.float64).eval()
    idx = np.array([[0, 3, 6, 2], [5, 5, 1, 4]])
    mnn.gradcheck(model, (idx,))  # deterministic: no dropout in evaluation mode
    with mnn.no_grad():
        logits = model.forward(idx)
    assert mnn.grad_enabled()
    np.testing.assert_array_equal(logits, model.forward(idx))
    model.release_caches()
    with pytest.raises(RuntimeError, match="oops"):
        with mnn.no_grad():
            raise RuntimeError("oops")
    assert mnn.grad_enabled()  # restored after an exception too


# -- sampling --------------------------------------------------------------------
def test_kv_cache_gives_the_logits_of_the_full_forward():
    model = GPT(TINY, seed=0, dtype=np.float64).eval()
    idx, _ = batch(TINY, B=3, T=12)
    full = model.forward(idx)
    logits, past = model.forward_cached(idx[:, :5])
    pieces = [logits]
    for t in range(5, 12):
        logits, past = model.forward_cached(idx[:, t:t + 1], past)
        pieces.append(logits)
    assert rel(np.concatenate(pieces, axis=1), full) <= 1e-12
    assert past[0][0].shape == (3, TINY.n_head, 12, TINY.n_embd // TINY.n_head)


def test_release_caches_reaches_every_module_also_in_a_replica():
    from mnn.parallel import share_weights

    for model in (GPT(TINY, seed=0), share_weights(GPT(TINY, seed=0))):
        idx, _ = batch(TINY, B=2, T=6)
        model.forward(idx)
        cached = [name for name, module in model.named_modules() if module.cache is not None]
        assert "lm_head" in cached and "transformer.h.0.attn.c_attn" in cached
        model.release_caches()
        assert [name for name, module in model.named_modules() if module.cache is not None] == []


def test_no_grad_forwards_leave_no_cache_anywhere():
    model, loss_fn = GPT(TINY, seed=0), CrossEntropyLoss()
    idx, targets = batch(TINY, B=2, T=6)
    with mnn.no_grad():
        loss_fn.forward(model.forward(idx), targets)
        model.forward_cached(idx)
    assert [name for name, module in model.named_modules() if module.cache is not None] == []
    assert loss_fn.cache is None
    loss_fn.forward(model.forward(idx), targets)  # outside no_grad the caches are kept again
    assert model.lm_head.cache is not None and model.transformer.h[0].attn.c_attn.cache is not None
    assert loss_fn.cache is not None


def test_generate_shapes_determinism_and_cache_equivalence():
    model = GPT(TINY, seed=0, dtype=np.float64).train()
    context = np.array([[1, 2, 3], [4, 5, 6]])
    out = model.generate(context, 30, temperature=0.8, top_k=5, rng=7)  # slides past block_size
    assert out.shape == (2, 33) and np.array_equal(out[:, :3], context)
    assert out.min() >= 0 and out.max() < TINY.vocab_size
    assert np.array_equal(out, model.generate(context, 30, temperature=0.8, top_k=5, rng=7, use_cache=False))
    assert model.training  # the mode is restored
    greedy = model.generate(context, 5, top_k=1, rng=0)
    assert np.array_equal(greedy, model.generate(context, 5, top_k=1, rng=1))


def test_top_k_restricts_the_samples():
    model = GPT(TINY, seed=0, dtype=np.float64)
    context = np.zeros((64, 1), dtype=np.int64)
    logits, _ = model.forward_cached(context[:1])
    allowed = set(np.argsort(logits[0, -1])[-3:].tolist())
    samples = model.generate(context, 1, top_k=3, rng=0)[:, 1]
    assert set(samples.tolist()) <= allowed and len(set(samples.tolist())) > 1
