r"""GPT-2 as in nanoGPT: the config, the model, its backward pass and sampling.

Parameter names are nanoGPT's, so ``GPT.state_dict()`` loads into nanoGPT's
PyTorch model unchanged (and back)::

    transformer.wte.weight                 (V, C)   token embedding, tied to lm_head.weight
    transformer.wpe.weight                 (block_size, C)
    transformer.h.{i}.ln_1.weight / .bias  (C,)
    transformer.h.{i}.attn.c_attn.weight   (3C, C)  / .bias (3C,)
    transformer.h.{i}.attn.c_proj.weight   (C, C)   / .bias (C,)
    transformer.h.{i}.ln_2.weight / .bias  (C,)
    transformer.h.{i}.mlp.c_fc.weight      (4C, C)  / .bias (4C,)
    transformer.h.{i}.mlp.c_proj.weight    (C, 4C)  / .bias (C,)
    transformer.ln_f.weight / .bias        (C,)
    lm_head.weight                         (V, C)   the same array as wte

The model returns logits; the loss (``mnn.losses.CrossEntropyLoss``) is
separate and owns the mean, and ``backward(dlogits)`` fills every gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy

from mnn.backend import default_dtype, to_numpy, xp
from mnn.errors import ShapeError
from mnn.layers import GELU, Dropout, Embedding, LayerNorm, Linear, MultiHeadAttention
from mnn.models.sampling import sample_next
from mnn.module import Module, ModuleList, check_input, no_grad


@dataclass
class GPTConfig:
    """nanoGPT's hyper-parameters (same names and defaults as its Shakespeare-char config, bar dropout)."""

    block_size: int = 256
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True


class MLP(Module):
    r"""The block's feed-forward part: ``c_fc`` ($C \to 4C$), GELU, ``c_proj`` ($4C \to C$), dropout.

    Forward, per token: $\text{out} = \operatorname{dropout}\big(W_2\, \operatorname{GELU}(W_1 x + b_1) + b_2\big)$.
    Backward is the chain rule through the four layers in reverse, each
    layer's own vector-Jacobian product (see :class:`~mnn.layers.Linear`,
    :class:`GELU`, :class:`~mnn.layers.Dropout`). Cache: ``(B, T)`` only.
    """

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True,
                 rng: numpy.random.Generator | None = None, dtype=None) -> None:
        super().__init__()
        rng = rng if rng is not None else numpy.random.default_rng()
        self.n_embd = n_embd
        self.c_fc = Linear(n_embd, 4 * n_embd, bias=bias, rng=rng, dtype=dtype)
        self.gelu = GELU()
        self.c_proj = Linear(4 * n_embd, n_embd, bias=bias, rng=rng, dtype=dtype)
        self.dropout = Dropout(dropout, rng=rng)

    def forward(self, x):
        check_input(self, x, last_dim=self.n_embd, ndim=3)
        B, T, C = x.shape
        h = self.gelu.forward(self.c_fc.forward(x.reshape(B * T, C)))
        out = self.dropout.forward(self.c_proj.forward(h))
        self.cache = (B, T)
        return out.reshape(B, T, C)

    def backward(self, dy):
        B, T = self.pop_cache()
        C = self.n_embd
        dh = self.c_proj.backward(self.dropout.backward(dy.reshape(B * T, C)))
        return self.c_fc.backward(self.gelu.backward(dh)).reshape(B, T, C)


class Block(Module):
    r"""One pre-LN Transformer block: $x + \operatorname{attn}(\operatorname{ln}_1 x)$, then $+ \operatorname{mlp}(\operatorname{ln}_2 \cdot)$.

    Forward:

    $$
    h = x + \operatorname{attn}\big(\operatorname{LN}_1(x)\big), \qquad
    z = h + \operatorname{mlp}\big(\operatorname{LN}_2(h)\big). \tag{1}
    $$

    Backward. A residual connection $z = h + f(h)$ has Jacobian
    $\partial z / \partial h = I + J_f$, so its vector-Jacobian product is the
    sum of the two paths, the identity path and the branch:

    $$
    \frac{\partial L}{\partial h} = g_z + J_{\text{mlp} \circ \text{LN}_2}^\top\, g_z, \qquad
    \frac{\partial L}{\partial x} = g_h + J_{\text{attn} \circ \text{LN}_1}^\top\, g_h, \tag{2}
    $$

    with $g_z = \partial L / \partial z$ and $g_h = \partial L / \partial h$.
    The identity path is why gradients reach early layers undiminished.
    Cache: nothing (the sub-layers keep theirs).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 causal: bool = True, rng: numpy.random.Generator | None = None, dtype=None) -> None:
        super().__init__()
        rng = rng if rng is not None else numpy.random.default_rng()
        self.ln_1 = LayerNorm(n_embd, bias=bias, dtype=dtype)
        self.attn = MultiHeadAttention(n_embd, n_head, causal=causal, dropout=dropout, bias=bias,
                                       rng=rng, dtype=dtype)
        self.ln_2 = LayerNorm(n_embd, bias=bias, dtype=dtype)
        self.mlp = MLP(n_embd, dropout=dropout, bias=bias, rng=rng, dtype=dtype)

    def forward(self, x):
        # The branch outputs are fresh arrays that nothing else holds: add in place.
        h = self.attn.forward(self.ln_1.forward(x))
        h += x  # Eq. (1)
        z = self.mlp.forward(self.ln_2.forward(h))
        z += h  # Eq. (1)
        return z

    def backward(self, dz):
        dh = self.ln_2.backward(self.mlp.backward(dz))
        dh += dz  # Eq. (2): branch + identity path
        dx = self.ln_1.backward(self.attn.backward(dh))
        dx += dh  # Eq. (2)
        return dx


class GPT(Module):
    r"""A decoder-only Transformer language model (GPT-2 layout, pre-LN, tied embeddings).

    Forward, for token ids $i \in \{0..V-1\}^{B \times T}$, $T \le$ ``block_size``:

    $$
    x_0 = \operatorname{dropout}\big(W_{\text{te}}[i] + W_{\text{pe}}[0..T-1]\big), \qquad
    x_l = \operatorname{Block}_l(x_{l-1}), \qquad
    \text{logits} = \operatorname{LN}_f(x_L)\, W_{\text{te}}^\top. \tag{1}
    $$

    Backward. Every piece is a layer with its own vector-Jacobian product, run
    in reverse. Two are particular to the model:

    * the position embedding is broadcast over the batch, so its gradient sums
      the batch: $\partial L / \partial W_{\text{pe}}[t] = \sum_b \partial L / \partial x_0[b, t]$;
    * $W_{\text{te}}$ is used twice (lookup and output projection), so its
      gradient is the sum of both uses, with $h = \operatorname{LN}_f(x_L)$:

    $$
    \frac{\partial L}{\partial W_{\text{te}}} = G_{\text{logits}}^\top\, h
    + \operatorname{scatter}\Big(\frac{\partial L}{\partial x_0}\Big). \tag{2}
    $$

    Tying makes ``lm_head`` hold the *same* weight array and gradient buffer
    as ``transformer.wte`` (:meth:`~mnn.module.Module.tie_parameter`), and both
    layers accumulate (``+=``), so (2) happens by itself.

    Initialisation (GPT-2 / nanoGPT): Linear and Embedding weights
    $\mathcal{N}(0, 0.02^2)$, the residual projections ``c_proj``
    $\mathcal{N}(0, (0.02/\sqrt{2 n_{\text{layer}}})^2)$ so the residual
    stream's variance does not grow with depth, biases 0, LayerNorm 1 and 0.

    Args:
        config: a :class:`GPTConfig`.
        seed: seeds the initialisation and the dropout masks.
        rng: a ``numpy.random.Generator`` to use instead of ``seed``.
        dtype: parameter dtype (default: ``mnn.backend.default_dtype()``).
    """

    def __init__(self, config: GPTConfig, seed: int = 0, rng: numpy.random.Generator | None = None,
                 dtype=None) -> None:
        super().__init__()
        self.config = config
        rng = rng if rng is not None else numpy.random.default_rng(seed)
        dtype = dtype or default_dtype()
        c = config
        self.transformer = Module()  # a plain container, for nanoGPT's "transformer." prefix
        self.transformer.wte = Embedding(c.vocab_size, c.n_embd, rng=rng, dtype=dtype)
        self.transformer.wpe = Embedding(c.block_size, c.n_embd, rng=rng, dtype=dtype)
        self.transformer.drop = Dropout(c.dropout, rng=rng)
        self.transformer.h = ModuleList(
            Block(c.n_embd, c.n_head, dropout=c.dropout, bias=c.bias, rng=rng, dtype=dtype)
            for _ in range(c.n_layer))
        self.transformer.ln_f = LayerNorm(c.n_embd, bias=c.bias, dtype=dtype)
        self.lm_head = Linear(c.n_embd, c.vocab_size, bias=False, rng=rng, dtype=dtype)
        self.lm_head.tie_parameter("weight", self.transformer.wte, "weight")
        self._init_weights(rng)

    def _init_weights(self, rng: numpy.random.Generator) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                param[...] = xp.asarray(rng.normal(0.0, residual_std, param.shape), dtype=param.dtype)
            elif param.ndim == 2:  # every other Linear and Embedding weight
                param[...] = xp.asarray(rng.normal(0.0, 0.02, param.shape), dtype=param.dtype)
            elif name.endswith(".bias"):  # Linear biases (LayerNorm's are 0 already)
                param[...] = 0

    # -- the two passes -----------------------------------------------------
    def check_ids(self, idx) -> None:
        """Refuse ids that are not ``(B, T)`` integers with ``T <= block_size``."""
        if getattr(idx, "ndim", None) != 2:
            raise ShapeError(f"GPT: expected token ids of shape (B, T), got shape {tuple(getattr(idx, 'shape', ()))}")
        if idx.shape[1] > self.config.block_size:
            raise ShapeError(f"GPT: sequence length T={idx.shape[1]} exceeds block_size={self.config.block_size}")

    def forward(self, idx):
        """``idx (B, T)`` integer ids -> logits ``(B, T, V)``."""
        self.check_ids(idx)
        t = self.transformer
        B, T = idx.shape
        x = t.wte.forward(idx)
        x += t.wpe.lookup(xp.arange(T))  # Eq. (1): (B, T, C) + (T, C), broadcast over the batch; T <= block_size
        x = t.drop.forward(x)
        for block in t.h:
            x = block.forward(x)  # Eq. (1)
        x = t.ln_f.forward(x)
        logits = self.lm_head.forward(x.reshape(B * T, -1))  # Eq. (1): one (B*T, C) x (C, V) GEMM
        self.cache = (B, T)
        return logits.reshape(B, T, -1)

    def backward(self, dlogits) -> None:
        """Accumulate the gradient of every parameter from ``dlogits (B, T, V)``; returns ``None``."""
        B, T = self.pop_cache()
        t = self.transformer
        dx = self.lm_head.backward(dlogits.reshape(B * T, -1)).reshape(B, T, -1)  # Eq. (2): wte, first use
        dx = t.ln_f.backward(dx)
        for block in reversed(t.h.items):
            dx = block.backward(dx)
        dx = t.drop.backward(dx)
        t.wte.backward(dx)  # Eq. (2): wte, second use (same gradient buffer)
        t.wpe.backward(dx.sum(axis=0))  # the batch-broadcast position embedding

    # -- generation ---------------------------------------------------------
    @no_grad()
    def forward_cached(self, idx, past=None):
        r"""Inference-only forward with a key/value cache: logits of the new positions, and the new cache.

        ``idx (B, T_new)`` are the tokens after the ``T_past`` already in ``past``
        (a list with one ``(K, V)`` pair of ``(B, NH, T_past, hs)`` per layer,
        or ``None``); they sit at positions ``T_past .. T_past + T_new - 1``.
        Attention of the new queries over all keys is exactly what the full
        forward computes for those rows, because the causal mask hides later
        keys anyway. No dropout, nothing kept for backward.
        """
        self.check_ids(idx)
        t = self.transformer
        B, T = idx.shape
        start = 0 if past is None else int(past[0][0].shape[2])
        if start + T > self.config.block_size:
            raise ShapeError(f"GPT: cached length {start} + {T} new tokens exceeds block_size={self.config.block_size}")
        x = t.wte.forward(idx) + t.wpe.forward(xp.arange(start, start + T))
        present = []
        for layer, block in enumerate(t.h):
            attn_out, kv = block.attn.forward_cached(block.ln_1.forward(x), None if past is None else past[layer])
            x = x + attn_out
            x = x + block.mlp.forward(block.ln_2.forward(x))
            present.append(kv)
        logits = self.lm_head.forward(t.ln_f.forward(x).reshape(B * T, -1)).reshape(B, T, -1)
        return logits, present

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 rng: numpy.random.Generator | None = None, use_cache: bool = True):
        """Sample ``max_new_tokens`` tokens after ``idx (B, T)``; returns the ids ``(B, T + max_new_tokens)`` on the host.

        Each step feeds at most the last ``block_size`` tokens, divides the last
        position's logits by ``temperature``, keeps the ``top_k`` largest (if
        given) and samples from their softmax. With ``use_cache`` the keys and
        values of earlier tokens are kept (``forward_cached``) and only the new
        token is computed; once the context is full the window slides and the
        cache is rebuilt from the cropped context. Dropout is off while
        sampling; the train/eval mode is restored afterwards.
        """
        if temperature <= 0:
            raise ValueError(f"GPT.generate: temperature must be > 0, got {temperature}")
        rng = rng if isinstance(rng, numpy.random.Generator) else numpy.random.default_rng(rng)
        idx = numpy.asarray(to_numpy(idx))
        if idx.ndim != 2 or idx.shape[1] == 0:
            raise ShapeError(f"GPT.generate: expected a non-empty (B, T) context, got shape {idx.shape}")
        was_training = self.training
        self.eval()
        past = None
        try:
            with no_grad():  # forward only: layers keep nothing for a backward
                for _ in range(max_new_tokens):
                    context = idx[:, -self.config.block_size:]
                    if not use_cache:
                        logits = self.forward(xp.asarray(context))
                    elif past is None:
                        logits, past = self.forward_cached(xp.asarray(context))
                    else:
                        logits, past = self.forward_cached(xp.asarray(idx[:, -1:]), past)
                    if past is not None and past[0][0].shape[2] >= self.config.block_size:
                        past = None  # the window slides next step: positions change, rebuild
                    next_ids = sample_next(logits[:, -1, :], temperature, top_k, rng)
                    idx = numpy.concatenate([idx, next_ids[:, None].astype(idx.dtype)], axis=1)
        finally:
            self.train(was_training)
        return idx

    def extra_repr(self) -> str:
        return f"{self.config}, parameters={self.num_parameters():,}"
