r"""Embedding: a lookup table whose backward scatters rows back into the table."""

from __future__ import annotations

import numpy

from mnn.backend import default_dtype, defer_check, on_cpu, xp
from mnn.errors import InputError, ShapeError
from mnn.module import Module, check_output_grad


class Embedding(Module):
    r"""A lookup table: token id $i$ selects row $i$ of the weight $W \in \mathbb{R}^{V \times C}$.

    Forward, for ids $i_1, \dots, i_N$ (any shape, flattened here to $N$):

    $$
    y_{n,c} = W_{i_n, c}. \tag{1}
    $$

    Equivalently $Y = S W$ with the one-hot selection matrix
    $S \in \{0, 1\}^{N \times V}$, $S_{nv} = [i_n = v]$; the code never forms $S$
    and gathers rows instead (``take``).

    Backward. The element partials of (1) are

    $$
    \frac{\partial y_{n,c}}{\partial W_{v,d}} = [i_n = v]\, \delta_{cd},
    $$

    i.e. the Jacobian of $\operatorname{vec} Y$ with respect to $\operatorname{vec} W$
    is $S \otimes I_C$. Its transpose applied to the upstream gradient $G$ is
    $S^\top G$: row $v$ of the weight gradient sums the gradient rows of every
    position that looked up $v$ (a *scatter-add*):

    $$
    \frac{\partial L}{\partial W_{v,:}} = \sum_{n \,:\, i_n = v} G_{n,:}. \tag{2}
    $$

    The ids are integers, so there is no input gradient (``backward`` returns ``None``).

    How (2) is computed. ``numpy.add.at`` is the obvious scatter-add and is
    slow. Measured (numpy 2.4, float32, accumulating into an existing
    gradient, best of 15 runs, microseconds, 2 BLAS threads on a shared machine):

    | ids $N$, $V$, $C$     | ``add.at`` | one-hot GEMM | flat ``bincount`` | sorted segments |
    |-----------------------|-----------:|-------------:|------------------:|----------------:|
    | 768, 65, 128          |        841 |          128 |               775 |             129 |
    | 3072, 65, 384         |      10092 |         3152 |              9288 |            2837 |
    | 768, 1024, 128        |       1203 |        11201 |               491 |             889 |
    | 8192, 50257, 768      |      56567 |  (too large) |            102667 |           62715 |

    The one-hot GEMM $S^\top G$ ties at $V = 65$ but costs $N V C$ and
    allocates $V \times N$; a ``bincount`` over flattened ``(id, column)``
    pairs accumulates in float64 into a $V \times C$ array. The sorted-segment
    sum (sort the ids, sum each run of equal ids with ``add.reduceat``, add the
    $U \le N$ sums to their rows) costs $O(N \log N + N C)$ whatever $V$ is,
    is the fastest or tied where ids repeat (a character vocabulary), and
    CuPy has every piece of it, so it is the one used. When nearly every id
    is distinct (GPT-2's 50257 tokens) nothing is saved by grouping and it is
    about as fast as ``add.at``.

    Args:
        num_embeddings: $V$, the number of rows (ids ``0 .. V-1``).
        embedding_dim: $C$, the size of each row.
        rng: a ``numpy.random.Generator`` for the initialisation, $\mathcal{N}(0, 1)$ as in PyTorch.

    Cache: the ids (``int``, the input's shape), nothing else.

    FLOPs: no matrix product (0): (1) is a gather and (2) a scatter of sums.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 rng: numpy.random.Generator | None = None, dtype=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        rng = rng if rng is not None else numpy.random.default_rng()
        weight = rng.standard_normal((num_embeddings, embedding_dim))
        self.add_parameter("weight", xp.asarray(weight, dtype=dtype or default_dtype()))

    def check_ids(self, ids) -> None:
        """Refuse non-integer ids (ShapeError) and ids outside ``[0, V)`` (InputError), naming the bad id."""
        if not xp.issubdtype(getattr(ids, "dtype", numpy.dtype(float)), xp.integer):
            raise ShapeError(f"{self!r}: ids must be an integer array, got dtype {getattr(ids, 'dtype', type(ids))}")
        if ids.size == 0:
            return
        if not on_cpu():  # on a device: checked with the step's loss, in its read-back (no read of its own)
            defer_check(xp.any((ids < 0) | (ids >= self.num_embeddings)), lambda: self._out_of_range(ids))
            return
        self._out_of_range(ids)

    def _out_of_range(self, ids) -> None:
        lowest, highest = int(ids.min()), int(ids.max())
        if lowest < 0 or highest >= self.num_embeddings:
            bad = lowest if lowest < 0 else highest
            raise InputError(f"{self!r}: id {bad} out of range [0, {self.num_embeddings})")

    def forward(self, ids):
        self.check_ids(ids)
        return self.lookup(ids)

    def lookup(self, ids):
        """:meth:`forward` without :meth:`check_ids`, for ids the caller made in range (a model's positions)."""
        self.cache = ids
        return xp.take(self.params["weight"], ids, axis=0)  # Eq. (1)

    def backward(self, dy):
        ids = self.pop_cache()
        check_output_grad(self, dy, ids.shape + (self.embedding_dim,))
        unique, sums = sum_rows_by_id(ids.reshape(-1), dy.reshape(-1, self.embedding_dim))  # Eq. (2)
        self.grads["weight"][unique] += sums  # Eq. (2): the ids are unique here
        return None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def sum_rows_by_id(ids, rows):
    r"""$S^\top G$ without $S$: the rows of ``rows (N, C)`` summed per distinct id of ``ids (N,)``.

    Returns ``(unique ids (U,), sums (U, C))``, the ids in increasing order: sorted
    segments, as :class:`Embedding` measures (sort the ids, one ``add.reduceat`` per
    run of equal ids).
    """
    order = xp.argsort(ids)
    sorted_ids = ids[order]
    run_starts = xp.flatnonzero(xp.concatenate((xp.ones(1, dtype=bool), sorted_ids[1:] != sorted_ids[:-1])))
    return sorted_ids[run_starts], xp.add.reduceat(xp.take(rows, order, axis=0), run_starts, axis=0)
