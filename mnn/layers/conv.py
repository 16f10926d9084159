r"""Conv2d: two-dimensional cross-correlation as im2col and one matrix product per group, NCHW as PyTorch.

This file runs past the ~400-line guide because the docstring carries the
whole derivation (forward, both gradients, the flipped-kernel form with a
worked 3x3 example); the code itself is about 150 lines.
"""

from __future__ import annotations

import math

import numpy

from mnn import blas, jit
from mnn.backend import default_dtype, xp
from mnn.errors import ShapeError
from mnn.module import Module, check_input, check_output_grad


def pair(value, name: str) -> tuple[int, int]:
    """``3 -> (3, 3)``, ``(3, 5) -> (3, 5)``, as PyTorch's ``_pair``; refuses anything else."""
    pair_ = (value, value) if isinstance(value, (int, numpy.integer)) else tuple(value)
    if len(pair_) != 2 or not all(isinstance(v, (int, numpy.integer)) and not isinstance(v, bool) for v in pair_):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(pair_[0]), int(pair_[1])


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    r"""$\lfloor (H + 2p - d(k - 1) - 1) / s \rfloor + 1$, PyTorch's output length along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class Conv2d(Module):
    r"""2-D convolution (cross-correlation, as in PyTorch) of an ``(N, C_in, H, W)`` batch.

    Forward. With kernel $k_H \times k_W$, stride $s$, padding $p$ (zeros),
    dilation $d$, the padded input $\tilde x$ and, in the group $g$ that
    output channel $o$ belongs to, the input channels $c$ of that group:

    $$
    y_{n,o,i,j} = b_o + \sum_{c} \sum_{u=0}^{k_H-1} \sum_{v=0}^{k_W-1}
    W_{o,c,u,v}\; \tilde x_{n,\,c,\; s i + d u,\; s j + d v}, \tag{1}
    $$

    for $0 \le i < H_o = \lfloor (H + 2p - d(k_H-1) - 1)/s \rfloor + 1$ (and
    likewise $j$). **im2col** gathers, for every output position
    $m = (n, i, j)$, the $K = k_H k_W C_g$ input values (1) multiplies into a
    row of a column matrix $X_{\mathrm{col}} \in \mathbb{R}^{M \times K}$,
    $M = N H_o W_o$:

    $$
    X_{\mathrm{col}}[(n,i,j),\,(u,v,c)] = \tilde x_{n,\,c,\; s i + d u,\; s j + d v}, \tag{2}
    $$

    so that (1) becomes, per group, one matrix product with the kernel
    flattened to $W_{\mathrm{col}} \in \mathbb{R}^{K \times C_{\mathrm{out},g}}$:

    $$
    Y = X_{\mathrm{col}}\, W_{\mathrm{col}} + \mathbf{1} b^\top. \tag{3}
    $$

    The code builds (2) with **one slice copy per kernel offset** $(u, v)$:
    for a fixed offset, (2) is the strided view
    $\tilde x[:, :, du : du + sH_o : s,\ dv : dv + sW_o : s]$ of the padded
    input, copied into its place in a preallocated buffer. There is no loop
    over output positions, only $k_H k_W$ copies. With numba (:mod:`mnn.jit`)
    and more than one channel per group, (2) is instead one compiled pass
    that reads $x$ in place (the padding is written as zeros, no padded copy
    of $x$ is made), and col2im (7) one compiled pass that adds into the
    gradient of $x$ directly (measured at batch 128, 32 -> 64 channels on
    14x14: forward and backward 15 ms against 24 ms for the slice copies;
    with one channel per group the $k_H k_W$ slice copies are the faster:
    2.3 ms for the loop against 1.4 ms).

    Working layout. Internally the layer works channels-last (NHWC): the
    padded input is ``(N, H+2p, W+2p, C_in)``, the columns
    ``(N, H_o, W_o, G, k_H, k_W, C_g)`` and the product's output
    ``(N, H_o, W_o, C_out)``. Each slice copy then moves whole contiguous
    channel vectors, and the output is already in the product's row order,
    so no transpose is copied. The returned array has the NCHW shape
    ``(N, C_out, H_o, W_o)`` (a transposed view: PyTorch's
    ``channels_last`` memory format); numpy's element-wise operations keep
    that memory order, and the next Conv2d reads it back without a copy.
    Measured on 2 cores against NCHW im2col through ``as_strided`` and a
    reshape copy: 2-4 times faster (``../shared/HINTS.md``).

    Backward. The partial derivatives of (1) are

    $$
    \frac{\partial y_{n,o,i,j}}{\partial W_{o',c,u,v}} = \delta_{oo'}\, \tilde x_{n,\,c,\, si+du,\, sj+dv}, \qquad
    \frac{\partial y_{n,o,i,j}}{\partial b_{o'}} = \delta_{oo'}, \qquad
    \frac{\partial y_{n,o,i,j}}{\partial \tilde x_{n,c,h,w}} = \sum_{u,v} W_{o,c,u,v}\,
    \mathbb{1}[h = si + du]\, \mathbb{1}[w = sj + dv].
    $$

    With $G = \partial L / \partial Y \in \mathbb{R}^{M \times C_{\mathrm{out},g}}$
    (the upstream gradient $g_{n,o,i,j}$ in the rows of (3)), (3) is a linear
    layer on the rows of $X_{\mathrm{col}}$, so as for :class:`~mnn.layers.Linear`

    $$
    \frac{\partial L}{\partial W_{\mathrm{col}}} = X_{\mathrm{col}}^\top G, \tag{4}
    $$

    $$
    \frac{\partial L}{\partial b} = \mathbf{1}^\top G
    \quad\Big(= \textstyle\sum_{n,i,j} g_{n,o,i,j}\Big), \tag{5}
    $$

    $$
    \frac{\partial L}{\partial X_{\mathrm{col}}} = G\, W_{\mathrm{col}}^\top. \tag{6}
    $$

    (4) is a product with the same columns forward built. **col2im** then
    returns (6) to the input: by (2) each entry of $\tilde x$ was copied into
    every column row whose window covers it, so its gradient is the sum of
    those rows' entries,

    $$
    \frac{\partial L}{\partial \tilde x_{n,c,h,w}} = \sum_{u,v}\; \sum_{i,j\,:\; si+du=h,\; sj+dv=w}
    \frac{\partial L}{\partial X_{\mathrm{col}}}[(n,i,j),(u,v,c)], \tag{7}
    $$

    which the code computes as one strided **add** per kernel offset, the
    exact reverse of the forward copies (the windows of different output
    positions overlap, so a plain assignment would lose terms; numpy's
    ``add.at`` is not needed because within one offset the targets of
    different $(i, j)$ are distinct). Finally $\partial L / \partial x$ is the
    interior of $\partial L / \partial \tilde x$ (the padding's gradient is
    dropped).

    The same gradient as a convolution. Substituting (6) into (7), for
    stride 1 and dilation 1:

    $$
    \frac{\partial L}{\partial \tilde x_{n,c,h,w}}
    = \sum_{o} \sum_{u,v} g_{n,o,\,h-u,\,w-v}\; W_{o,c,u,v}
    = \sum_{o} \sum_{u',v'} g^{0}_{n,o,\, h - (k_H-1) + u',\, w - (k_W-1) + v'}\;
    W_{o,c,\,k_H-1-u',\,k_W-1-v'}, \tag{8}
    $$

    with $u' = k_H-1-u$, and $g^{0}$ the upstream gradient padded with
    $k-1$ zeros on every side (so out-of-range $g$ are 0): the input gradient
    is the **full cross-correlation of the upstream gradient with the kernel
    flipped in both spatial axes** (and transposed in its channel axes: a
    sum over $o$ for each $c$), i.e. a transposed convolution. (With stride
    $s > 1$ the upstream gradient is first dilated by $s-1$ zeros between
    entries.) Worked 3x3 example, one channel, no padding: input $x$ is
    $3 \times 3$, kernel $W$ is $2 \times 2$, so $y$ and $g$ are $2 \times 2$:

    $$
    y_{00} = W_{00}x_{00} + W_{01}x_{01} + W_{10}x_{10} + W_{11}x_{11}, \quad
    y_{01} = W_{00}x_{01} + W_{01}x_{02} + W_{10}x_{11} + W_{11}x_{12}, \ \dots
    $$

    Collecting, by (7), every $y$ each input entry appears in:

    $$
    \frac{\partial L}{\partial x} =
    \begin{pmatrix}
    g_{00}W_{00} & g_{00}W_{01} + g_{01}W_{00} & g_{01}W_{01} \\
    g_{00}W_{10} + g_{10}W_{00} & g_{00}W_{11} + g_{01}W_{10} + g_{10}W_{01} + g_{11}W_{00} & g_{01}W_{11} + g_{11}W_{01} \\
    g_{10}W_{10} & g_{10}W_{11} + g_{11}W_{10} & g_{11}W_{11}
    \end{pmatrix},
    $$

    and that is (8): pad $g$ to $4 \times 4$ with a ring of zeros, slide the
    flipped kernel $\begin{pmatrix} W_{11} & W_{10} \\ W_{01} & W_{00} \end{pmatrix}$
    over it; e.g. the centre entry is
    $W_{11}g_{00} + W_{10}g_{01} + W_{01}g_{10} + W_{00}g_{11}$.
    The code does not build the padded, dilated $g$: (6)-(7) compute the
    same sums without multiplying the zeros.

    Cache: the column matrix $X_{\mathrm{col}}$ (forward built it; (4) needs
    it). Recomputing it from a cached input instead would cost backward
    another $k_H k_W$ slice copies; keeping it costs $k_H k_W$ times the
    input's memory (measured: caching the columns is the faster of the two).

    FLOPs (:meth:`flops`, matrix products), with $M = N H_o W_o$ rows and
    $K = k_H k_W C_g$: forward (3) is $2MKC_{\mathrm{out}}$ (all groups);
    backward (4) and (6) are $2MKC_{\mathrm{out}}$ each, $4MKC_{\mathrm{out}}$
    in all ($2MKC_{\mathrm{out}}$ with ``input_grad=False``). The copies of
    im2col (2) and the adds of col2im (7) are not products and not counted.

    Args:
        in_channels: $C_{\mathrm{in}}$.
        out_channels: $C_{\mathrm{out}}$.
        kernel_size, stride, padding, dilation: an int or a pair ``(height, width)``.
        groups: $G$; input and output channels are split into $G$ groups,
            each convolved separately ($G = C_{\mathrm{in}}$: depthwise).
        bias: whether to add $b$.
        rng: a ``numpy.random.Generator`` for the initialisation.
        input_grad: whether ``backward`` computes $\partial L / \partial x$
            (a first layer fed with data needs none; ``backward`` then returns ``None``).

    Weight ``(C_out, C_in / G, k_H, k_W)`` and bias ``(C_out,)``, initialised
    as PyTorch's: $U(-1/\sqrt{K}, 1/\sqrt{K})$, $K = C_g k_H k_W$ the fan-in
    (Kaiming-uniform with $a = \sqrt 5$).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, rng: numpy.random.Generator | None = None, dtype=None,
                 input_grad: bool = True) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: in_channels ({in_channels}) and out_channels ({out_channels}) must both "
                             f"be divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride, self.padding = pair(stride, "stride"), pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        if min(self.kernel_size + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"Conv2d: kernel_size, stride and dilation must be positive and padding >= 0, got "
                             f"{self.kernel_size}, {self.stride}, {self.dilation}, {self.padding}")
        self.input_grad = bool(input_grad)
        self._spare = None  # a column buffer no cache holds, reused by the next pass
        rng = rng if rng is not None else numpy.random.default_rng()
        dtype = dtype or default_dtype()
        kH, kW = self.kernel_size
        bound = 1.0 / math.sqrt(in_channels // groups * kH * kW)
        shape = (out_channels, in_channels // groups, kH, kW)
        self.add_parameter("weight", xp.asarray(rng.uniform(-bound, bound, shape), dtype=dtype))
        if bias:
            self.add_parameter("bias", xp.asarray(rng.uniform(-bound, bound, out_channels), dtype=dtype))

    def _column_buffer(self, shape, dtype):
        """The spare column buffer if it fits, else a new one: reusing it saves the page faults of a fresh one.

        Only a buffer nothing refers to any more becomes the spare (after
        backward's last use, or a forward under ``no_grad``), so two forwards
        before one backward each get their own.
        """
        spare, self._spare = self._spare, None
        if spare is not None and spare.shape == tuple(shape) and spare.dtype == dtype:
            return spare
        return xp.empty(shape, dtype=dtype)

    def _kernel_matrix(self):
        """$W_{\\mathrm{col}}$ of Eq. (3) per group: ``(G, K, C_out/G)`` with K ordered ``(u, v, c)`` as the columns."""
        G, (kH, kW) = self.groups, self.kernel_size
        weight = self.params["weight"]  # (C_out, C_g, kH, kW)
        per_group = weight.reshape(G, self.out_channels // G, self.in_channels // G, kH, kW)
        return per_group.transpose(0, 3, 4, 2, 1).reshape(G, kH * kW * (self.in_channels // G), -1)

    def forward(self, x):
        check_input(self, x, ndim=4)
        N, C, H, W = x.shape
        if C != self.in_channels:
            raise ShapeError(f"{self!r}: expected input (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        (kH, kW), (sH, sW), (pH, pW), (dH, dW) = self.kernel_size, self.stride, self.padding, self.dilation
        Ho, Wo = output_size(H, kH, sH, pH, dH), output_size(W, kW, sW, pW, dW)
        if Ho < 1 or Wo < 1:
            raise ShapeError(f"{self!r}: the kernel (dilated {dH * (kH - 1) + 1}x{dW * (kW - 1) + 1}) is larger "
                             f"than the padded input {H + 2 * pH}x{W + 2 * pW} (input shape {tuple(x.shape)})")
        G = self.groups
        Cg = C // G
        cols = self._column_buffer((N, Ho, Wo, G, kH, kW, Cg), x.dtype)  # X_col, Eq. (2)
        if jit.usable(cols) and Cg > 1:  # one compiled pass, straight from x (a view when channels-last): Eq. (2)
            _im2col_kernel(xp.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(N, H, W, G, Cg), cols,
                           sH, sW, pH, pW, dH, dW)
        else:
            padded = xp.zeros((N, H + 2 * pH, W + 2 * pW, C), dtype=x.dtype)  # x~, NHWC
            padded[:, pH:pH + H, pW:pW + W, :] = x.transpose(0, 2, 3, 1)
            padded = padded.reshape(N, H + 2 * pH, W + 2 * pW, G, Cg)
            for u in range(kH):
                for v in range(kW):  # one slice copy per kernel offset: Eq. (2)
                    cols[:, :, :, :, u, v, :] = padded[:, dH * u:dH * u + sH * (Ho - 1) + 1:sH,
                                                       dW * v:dW * v + sW * (Wo - 1) + 1:sW]
        M, K = N * Ho * Wo, kH * kW * Cg
        kernel = self._kernel_matrix().astype(x.dtype, copy=False)
        if G == 1:
            y = blas.matmul(cols.reshape(M, K), kernel[0])  # Eq. (3) (numpy's @, or MKL: mnn.blas)
        else:
            y = xp.empty((M, G, self.out_channels // G), dtype=x.dtype)
            blas.matmul(cols.reshape(M, G, K).transpose(1, 0, 2), kernel, out=y.transpose(1, 0, 2))  # Eq. (3)
            y = y.reshape(M, self.out_channels)
        if "bias" in self.params:
            y += self.params["bias"]  # Eq. (3)
        self.cache = (cols, (N, C, H, W))
        if self.cache is None:  # under no_grad: the columns are free for the next forward
            self._spare = cols
        return y.reshape(N, Ho, Wo, self.out_channels).transpose(0, 3, 1, 2)  # NCHW shape, channels-last memory

    def backward(self, dy):
        cols, (N, C, H, W) = self.pop_cache()
        _, Ho, Wo, G, kH, kW, Cg = cols.shape
        check_output_grad(self, dy, (N, self.out_channels, Ho, Wo))
        (sH, sW), (pH, pW), (dH, dW) = self.stride, self.padding, self.dilation
        M, K, Og = N * Ho * Wo, kH * kW * Cg, self.out_channels // G
        rows = xp.ascontiguousarray(dy.transpose(0, 2, 3, 1)).reshape(M, G, Og)  # G of Eq. (4); a view if channels-last
        cols_g = cols.reshape(M, G, K).transpose(1, 0, 2)  # (G, M, K)
        rows_g = rows.transpose(1, 0, 2)  # (G, M, Og)
        dkernel = blas.matmul(cols_g.transpose(0, 2, 1), rows_g)  # Eq. (4): (G, K, Og)
        dweight = dkernel.reshape(G, kH, kW, Cg, Og).transpose(0, 4, 3, 1, 2)  # back to (C_out, C_g, kH, kW)
        self.grads["weight"] += dweight.reshape(self.params["weight"].shape)  # Eq. (4)
        self._spare = cols  # Eq. (4) was its last use: backward's dcols or the next forward refills it
        if "bias" in self.params:
            self.grads["bias"] += xp.ones(M, dtype=dy.dtype) @ rows.reshape(M, G * Og)  # Eq. (5): 1^T G
        if not self.input_grad:
            return None
        kernel = self._kernel_matrix().astype(dy.dtype, copy=False)
        dcols = self._column_buffer(cols.shape, dy.dtype)
        blas.matmul(rows_g, kernel.transpose(0, 2, 1), out=dcols.reshape(M, G, K).transpose(1, 0, 2))  # Eq. (6)
        if jit.usable(dcols) and Cg > 1:  # col2im in one compiled pass, into x's shape (no padded buffer): Eq. (7)
            dx = xp.zeros((N, H, W, G, Cg), dtype=dy.dtype)
            _col2im_kernel(dcols, dx, sH, sW, pH, pW, dH, dW)
            self._spare = dcols
            return dx.reshape(N, H, W, C).transpose(0, 3, 1, 2)  # NCHW shape, channels-last memory
        dpadded = xp.zeros((N, H + 2 * pH, W + 2 * pW, G, Cg), dtype=dy.dtype)
        for u in range(kH):
            for v in range(kW):  # col2im: one strided add per kernel offset, Eq. (7)
                dpadded[:, dH * u:dH * u + sH * (Ho - 1) + 1:sH,
                        dW * v:dW * v + sW * (Wo - 1) + 1:sW] += dcols[:, :, :, :, u, v, :]
        self._spare = dcols
        dpadded = dpadded.reshape(N, H + 2 * pH, W + 2 * pW, C)
        return dpadded[:, pH:pH + H, pW:pW + W, :].transpose(0, 3, 1, 2)  # Eq. (7): drop the padding's gradient

    def flops(self, x_shape) -> tuple[int, int]:
        """``(2 M K C_out, 4 M K C_out)`` (backward halved without ``input_grad``): Eqs. (3), (4) and (6)."""
        N, _, H, W = x_shape
        (kH, kW), (sH, sW), (pH, pW), (dH, dW) = self.kernel_size, self.stride, self.padding, self.dilation
        rows = N * output_size(H, kH, sH, pH, dH) * output_size(W, kW, sW, pW, dW)
        product = 2 * rows * kH * kW * (self.in_channels // self.groups) * self.out_channels  # Eq. (3)
        return product, product * (2 if self.input_grad else 1)  # Eqs. (4) and (6)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if "bias" not in self.params:
            text += ", bias=False"
        return text + ("" if self.input_grad else ", input_grad=False")


@jit.kernel
def _im2col_kernel(x, cols, sH, sW, pH, pW, dH, dW):
    """Eq. (2) in one pass: ``cols[n, i, j, g, u, v, c]`` is ``x[n, s i + d u - p, s j + d v - p, g, c]``, or 0
    in the padding; ``x`` is ``(N, H, W, G, C_g)`` (channels-last), so each copy moves a channel vector."""
    N, H, W, G, Cg = x.shape
    Ho, Wo, kH, kW = cols.shape[1], cols.shape[2], cols.shape[4], cols.shape[5]
    for n in range(N):
        for i in range(Ho):
            for j in range(Wo):
                for g in range(G):
                    for u in range(kH):
                        h = i * sH - pH + u * dH
                        for v in range(kW):
                            w = j * sW - pW + v * dW
                            if 0 <= h < H and 0 <= w < W:
                                for c in range(Cg):
                                    cols[n, i, j, g, u, v, c] = x[n, h, w, g, c]  # Eq. (2)
                            else:
                                for c in range(Cg):
                                    cols[n, i, j, g, u, v, c] = 0.0  # the zero padding of x~


@jit.kernel
def _col2im_kernel(dcols, dx, sH, sW, pH, pW, dH, dW):
    """Eq. (7) in one pass: add each column entry's gradient into the input entry it was copied from (entries
    copied from the padding are dropped); ``dx`` is zeros ``(N, H, W, G, C_g)``."""
    N, H, W, G, Cg = dx.shape
    Ho, Wo, kH, kW = dcols.shape[1], dcols.shape[2], dcols.shape[4], dcols.shape[5]
    for n in range(N):
        for i in range(Ho):
            for j in range(Wo):
                for g in range(G):
                    for u in range(kH):
                        h = i * sH - pH + u * dH
                        for v in range(kW):
                            w = j * sW - pW + v * dW
                            if 0 <= h < H and 0 <= w < W:
                                for c in range(Cg):
                                    dx[n, h, w, g, c] += dcols[n, i, j, g, u, v, c]  # Eq. (7)
