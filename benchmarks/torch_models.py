"""The PyTorch side of the benchmark: what a user would write instead of mnn.

An MLP as ``nn.Sequential``, the CNN and the character LSTM (issues 14, 15),
and nanoGPT's GPT (same module names, so mnn's ``state_dict()`` loads into it
unchanged), written the way nanoGPT writes it:
``F.scaled_dot_product_attention`` with ``is_causal=True``, ``F.layer_norm``,
tied ``lm_head``. nanoGPT has no key/value cache; :meth:`GPT.forward` takes an
optional ``past`` (one ``(K, V)`` pair per layer) so that cached generation
can be compared with mnn's ``GPT.forward_cached``. GELU is the tanh form
(``approximate="tanh"``), as GPT-2 and mnn use, so both sides compute the same
function.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def mlp(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """``Linear -> ReLU -> Linear``, named ``0.weight, 0.bias, 2.weight, 2.bias`` like mnn's MLP."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class LayerNorm(nn.Module):
    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, past=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:  # the benchmark's key/value cache: append the new keys and values
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        # With a cache and one new token the query may see every key: no mask needed.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, past=None):
        attended, present = self.attn(self.ln_1(x), past)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), present


class GPT(nn.Module):
    """nanoGPT's ``GPT`` (dropout 0), plus an optional key/value cache for generation."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "wpe": nn.Embedding(config.block_size, config.n_embd),
            "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            "ln_f": LayerNorm(config.n_embd, config.bias),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as nanoGPT

    def forward(self, idx, past=None):
        """``idx (B, T)`` -> logits ``(B, T, V)`` and the per-layer ``(K, V)`` list."""
        start = 0 if past is None else past[0][0].size(2)
        positions = torch.arange(start, start + idx.size(1), dtype=torch.long)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        present = []
        for layer, block in enumerate(self.transformer.h):
            x, kv = block(x, None if past is None else past[layer])
            present.append(kv)
        return self.lm_head(self.transformer.ln_f(x)), present


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's ``configure_optimizers`` split: decay tensors with ``dim >= 2`` only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def cnn(channels=(32, 64), hidden: int = 128, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """mnn.models.CNN in ``torch.nn``: conv3x3 (no bias)-BatchNorm2d-ReLU-MaxPool2d(2) blocks, Flatten, fc, fc.

    The same ``nn.Sequential`` indices as mnn's (``0.weight``, ``1.running_mean``, ``9.weight``, ...).
    """
    layers, previous, size = [], 1, image_size
    for width in channels:
        layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                   nn.MaxPool2d(2)]
        previous, size = width, size // 2
    layers += [nn.Flatten(), nn.Linear(previous * size * size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


class CharRNN(nn.Module):
    """mnn.models.CharRNN (cell ``lstm``, dropout 0) in ``torch.nn``: ``wte``, ``rnn`` (batch first), ``head``."""

    def __init__(self, vocab_size: int, n_embd: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.rnn = nn.LSTM(n_embd, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx):
        """``idx (B, T)`` -> logits ``(B, T, V)`` from a zero initial state."""
        return self.head(self.rnn(self.wte(idx))[0])
