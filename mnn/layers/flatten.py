r"""Flatten: a reshape between convolutional and linear layers (its own file, as ``torch/nn/modules/flatten.py``)."""

from __future__ import annotations

from mnn.module import Module, check_input, check_output_grad


class Flatten(Module):
    r"""Merge dimensions ``start_dim`` to ``end_dim`` into one, as ``torch.nn.Flatten``: ``(N, C, H, W) -> (N, CHW)``.

    Forward: $y = \operatorname{reshape}(x)$, the entries in C (row-major)
    order of the NCHW shape, so a following :class:`~mnn.layers.Linear`
    sees the features in PyTorch's order (whatever the memory layout of $x$:
    a channels-last input is copied into that order).

    Backward. Each output entry is one input entry, so the Jacobian is a
    permutation of the identity (the identity in row-major order) and

    $$
    \frac{\partial L}{\partial x} = \operatorname{reshape}^{-1}(g). \tag{1}
    $$

    Cache: the input's shape.
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        check_input(self, x, min_ndim=1)
        ndim = x.ndim
        start, end = self.start_dim % ndim, self.end_dim % ndim
        if start > end:
            raise ValueError(f"{self!r}: start_dim comes after end_dim for a {ndim}-D input")
        self.cache = x.shape
        return x.reshape(*x.shape[:start], -1, *x.shape[end + 1:])

    def backward(self, dy):
        shape = self.pop_cache()
        start, end = self.start_dim % len(shape), self.end_dim % len(shape)
        size = 1
        for n in shape[start:end + 1]:
            size *= n
        check_output_grad(self, dy, (*shape[:start], size, *shape[end + 1:]))
        return dy.reshape(shape)  # Eq. (1)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
