"""Drawing the next token from a language model's last logits: temperature, top-k, one uniform draw per row."""

from __future__ import annotations

import numpy

from mnn.backend import to_numpy


def sample_next(logits, temperature: float, top_k: int | None, rng: numpy.random.Generator) -> numpy.ndarray:
    """One token id per row of ``logits (B, V)``, on the host.

    The logits are divided by ``temperature``, all but the ``top_k`` largest
    (if given) are dropped, and one id is drawn from the softmax of the rest by
    inverting its cumulative sum with one uniform number per row.
    """
    logits = to_numpy(logits).astype(numpy.float64) / temperature
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        kth = numpy.partition(logits, -k, axis=-1)[:, [-k]]  # the k-th largest
        logits[logits < kth] = -numpy.inf
    probs = numpy.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    cumulative = numpy.cumsum(probs, axis=-1)
    draws = rng.random((logits.shape[0], 1)) * cumulative[:, -1:]
    return (cumulative <= draws).sum(axis=-1).clip(max=probs.shape[-1] - 1)
