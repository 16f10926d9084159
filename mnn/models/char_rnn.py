"""Karpathy's char-rnn: a character embedding, a stack of LSTM (or GRU, or plain RNN) layers, a linear head."""

from __future__ import annotations

import numpy

from mnn import jit
from mnn.backend import to_numpy, xp
from mnn.errors import ShapeError
from mnn.layers import GRU, LSTM, RNN, Dropout, Embedding, Linear
from mnn.layers.input_projection import TableLookup
from mnn.models.sampling import sample_next
from mnn.module import Module, check_input, no_grad

CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


class CharRNN(Module):
    r"""Next-character logits from a recurrent stack: $\text{logits}_t = W\, h^{(L)}_t + b$.

    Forward, for ids ``idx (B, T)``: ``wte`` looks up ``(B, T, C)``, the
    recurrent stack ``rnn`` (batch first, zero initial state) gives the last
    layer's hidden states ``(B, T, H)``, dropout, then ``head`` gives
    ``(B, T, V)``. Backward runs the three layers' own vector-Jacobian products
    in reverse (backpropagation through time happens inside ``rnn``, see
    :class:`~mnn.layers.LSTM`). Names: ``wte.weight``, ``rnn.weight_ih_l0``,
    ... (``torch.nn.LSTM``'s), ``head.weight``, ``head.bias``.

    The embedding folded into layer 0: the stack can be given the ids
    themselves (:class:`~mnn.layers.input_projection.TableLookup`), and layer 0
    then projects the $V$ rows of the table, $(E W_{ih}^\top)[\text{idx}]$,
    instead of the $BT$ looked-up rows, $E[\text{idx}]\, W_{ih}^\top$; its
    backward sums the gradient rows per id and adds into ``wte``'s gradient
    directly (the derivation is in :mod:`mnn.layers.input_projection`). The
    results are the unfolded ones to rounding. ``fold_embedding``: ``None``
    (the default) folds where it pays, when the batch has more positions than
    the vocabulary has characters ($BT > V$) and the compiled kernels run
    (:mod:`mnn.jit`: the per-id sums are one compiled pass; numpy's sorted
    segments copy the wide gradient rows, and the folded step was 2-9% slower
    than the unfolded one with ``MNN_JIT=0``, 2026-12); ``True`` always folds,
    ``False`` never (the tests compare the two).

    Args:
        vocab_size: $V$, the number of characters.
        n_embd: $C$, the embedding width.
        hidden_size: $H$, the width of each recurrent layer.
        num_layers: recurrent layers stacked.
        cell: ``"lstm"``, ``"gru"`` or ``"rnn"`` (tanh).
        dropout: drop probability between the layers of the stack and before the head.
        seed: seeds the initialisation and the dropout masks.
    """

    def __init__(self, vocab_size: int, n_embd: int = 64, hidden_size: int = 256, num_layers: int = 2,
                 cell: str = "lstm", dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"CharRNN: unknown cell {cell!r}; choose from {sorted(CELLS)}")
        if min(vocab_size, n_embd, hidden_size, num_layers) < 1:
            raise ValueError(f"CharRNN: sizes must be positive, got vocab {vocab_size}, n_embd {n_embd}, "
                             f"hidden {hidden_size}, layers {num_layers}")
        rng = numpy.random.default_rng(seed)
        self.wte = Embedding(vocab_size, n_embd, rng=rng)
        self.rnn = CELLS[cell](n_embd, hidden_size, num_layers, batch_first=True, dropout=dropout, rng=rng)
        self.drop = Dropout(dropout, rng=numpy.random.default_rng([seed, 1]))
        self.head = Linear(hidden_size, vocab_size, rng=rng)
        self.fold_embedding = None  # None: fold wte into layer 0's input projection where it pays (see above)
        self.config = {"kind": "char-rnn", "vocab_size": vocab_size, "n_embd": n_embd, "hidden_size": hidden_size,
                       "num_layers": num_layers, "cell": cell, "dropout": dropout, "seed": seed}

    def check_ids(self, idx) -> None:
        check_input(self, idx, ndim=2)
        if idx.shape[1] == 0:
            raise ShapeError(f"{self!r}: expected at least one character, got shape {tuple(idx.shape)}")

    def step(self, idx, state=None):
        """Logits ``(B, T, V)`` and the final recurrent state, from ``state`` (``None``: zeros)."""
        self.check_ids(idx)
        B, T = idx.shape
        folded = self.fold_embedding
        if folded is None:
            folded = B * T > self.wte.num_embeddings and jit.enabled()
        h, state = self.rnn.forward(TableLookup(idx, self.wte) if folded else self.wte.forward(idx), state)
        H = h.shape[-1]
        logits = self.head.forward(self.drop.forward(h.reshape(B * T, H)))
        self.cache = (B, T, H, folded)
        return logits.reshape(B, T, -1), state

    def forward(self, idx):
        return self.step(idx)[0]

    def backward(self, dlogits) -> None:
        B, T, H, folded = self.pop_cache()
        dh = self.drop.backward(self.head.backward(dlogits.reshape(B * T, -1)))
        dx, _ = self.rnn.backward(dh.reshape(B, T, H))
        if not folded:  # folded, rnn's layer 0 added into wte's gradient itself
            self.wte.backward(dx)

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 rng: numpy.random.Generator | None = None):
        """Sample ``max_new_tokens`` ids after ``idx (B, T)``, carrying the recurrent state: one step per character.

        The prompt runs once through the stack; then each new character is fed
        alone with the state the previous step left. Returns the ids
        ``(B, T + max_new_tokens)`` on the host; dropout is off while sampling.
        """
        if temperature <= 0:
            raise ValueError(f"CharRNN.generate: temperature must be > 0, got {temperature}")
        rng = rng if isinstance(rng, numpy.random.Generator) else numpy.random.default_rng(rng)
        idx = numpy.asarray(to_numpy(idx))
        self.check_ids(idx)
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                logits, state = self.step(xp.asarray(idx))
                for _ in range(max_new_tokens):
                    next_ids = sample_next(logits[:, -1, :], temperature, top_k, rng)
                    idx = numpy.concatenate([idx, next_ids[:, None].astype(idx.dtype)], axis=1)
                    logits, state = self.step(xp.asarray(idx[:, -1:]), state)
        finally:
            self.train(was_training)
        return idx

    def extra_repr(self) -> str:
        return f"{self.config['cell']}, parameters={self.num_parameters():,}"
