r"""Spatial pooling of ``(N, C, H, W)`` batches: MaxPool2d, AvgPool2d and AdaptiveAvgPool2d, as in PyTorch.

Each window is visited as in :class:`~mnn.layers.Conv2d`: one strided view
of the (padded) input per kernel offset $(u, v)$, so there is no loop over
output positions; backward adds into the same views. The views are taken
of the input in its own memory layout (:func:`_planes`): a channels-last
input, as :class:`~mnn.layers.Conv2d` returns, is read whole channel vectors
at a time, and the output and the input gradient keep its layout, so the
next element-wise layer runs on dense memory. MaxPool2d has compiled loops
(:mod:`mnn.jit`) beside the numpy path, tested against it.
"""

from __future__ import annotations

import numpy

from mnn import jit
from mnn.backend import xp
from mnn.errors import ShapeError
from mnn.layers.conv import output_size, pair
from mnn.module import Module, check_input, check_output_grad


def _planes(x, channels_last: bool):
    """``(N, C, H, W)`` as the 4-D C-contiguous array ``(A, H, W, B)`` the pooling loops run over, a view of ``x``
    in its own layout: ``(N, H, W, C)`` for channels-last memory, ``(N C, H, W, 1)`` for NCHW (else a copy)."""
    N, C, H, W = x.shape
    if channels_last:
        return xp.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return xp.ascontiguousarray(x).reshape(N * C, H, W, 1)


def _unplanes(planes, N: int, C: int, channels_last: bool):
    """``(A, H_o, W_o, B)`` back to the NCHW shape ``(N, C, H_o, W_o)``, in the input's memory layout."""
    if channels_last:
        return planes.transpose(0, 3, 1, 2)
    return planes.reshape(N, C, planes.shape[1], planes.shape[2])


def _windows(layer, x, fill):
    """``(planes, H_o, W_o, views, channels_last)``: the view of every kernel offset, Eq. (1) of the pooling layers.

    The windows slide over axes 1 and 2 of :func:`_planes`, so a channels-last
    input (:class:`~mnn.layers.Conv2d`'s output) is read in its own memory
    order, whole channel vectors at a time, and the output keeps that layout.
    """
    check_input(layer, x, ndim=4)
    N, C, H, W = x.shape
    (kH, kW), (sH, sW), (pH, pW) = layer.kernel_size, layer.stride, layer.padding
    if pH > kH // 2 or pW > kW // 2:
        raise ShapeError(f"{layer!r}: padding should be at most half the kernel size, as in PyTorch")
    Ho, Wo = output_size(H, kH, sH, pH), output_size(W, kW, sW, pW)
    if Ho < 1 or Wo < 1:
        raise ShapeError(f"{layer!r}: the kernel {kH}x{kW} is larger than the padded input "
                         f"{H + 2 * pH}x{W + 2 * pW} (input shape {tuple(x.shape)})")
    channels_last = not x.flags.c_contiguous and x.transpose(0, 2, 3, 1).flags.c_contiguous
    planes = _planes(x, channels_last)
    padded = planes
    if pH or pW:
        A, _, _, B = planes.shape
        padded = xp.full((A, H + 2 * pH, W + 2 * pW, B), fill, dtype=x.dtype)
        padded[:, pH:pH + H, pW:pW + W] = planes
    views = [padded[:, u:u + sH * (Ho - 1) + 1:sH, v:v + sW * (Wo - 1) + 1:sW]
             for u in range(kH) for v in range(kW)]
    return planes, Ho, Wo, views, channels_last


def _scatter(layer, shape, dy_planes, parts, channels_last):
    """Add ``parts[k]`` (the gradient of offset k's view) into a zero padded input; return its interior (NCHW)."""
    N, C, H, W = shape
    (_, kW), (sH, sW), (pH, pW) = layer.kernel_size, layer.stride, layer.padding
    A, Ho, Wo, B = dy_planes.shape
    dpadded = xp.zeros((A, H + 2 * pH, W + 2 * pW, B), dtype=dy_planes.dtype)
    for k, part in enumerate(parts):
        u, v = divmod(k, kW)
        dpadded[:, u:u + sH * (Ho - 1) + 1:sH, v:v + sW * (Wo - 1) + 1:sW] += part  # one strided add per offset
    return _unplanes(dpadded[:, pH:pH + H, pW:pW + W], N, C, channels_last)


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0) -> None:
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if min(self.kernel_size + self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{type(self).__name__}: kernel_size and stride must be positive and padding >= 0")

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    r"""The maximum of each $k_H \times k_W$ window (stride defaults to the kernel size; padding is $-\infty$).

    Forward, over the window $\mathcal{W}_{ij}$ of output $(i, j)$ in each
    image and channel:

    $$
    y_{ij} = \max_{(h,w) \in \mathcal{W}_{ij}} x_{hw}, \qquad
    a_{ij} = \operatorname*{arg\,max}_{(h,w) \in \mathcal{W}_{ij}} x_{hw}. \tag{1}
    $$

    Backward. Where the maximum is unique, $y_{ij}$ is locally the single
    input $x_{a_{ij}}$, so $\partial y_{ij} / \partial x_{hw} = \mathbb{1}[(h,w) = a_{ij}]$:
    the Jacobian has one 1 per row, and the upstream gradient is routed to the
    arg-max of each window (added where windows overlap and share an arg-max):

    $$
    \frac{\partial L}{\partial x_{hw}} = \sum_{i,j} g_{ij}\, \mathbb{1}[(h,w) = a_{ij}]. \tag{2}
    $$

    Why a finite-difference check needs inputs without ties: where two
    entries of a window are equal (or closer than the step $\epsilon$), the
    maximum is not differentiable there: nudging either entry up by
    $\epsilon$ raises $y$, nudging it down does not, so the central
    difference gives $g/2$ to each while the analytic gradient gives $g$ to
    the first. Tests draw distinct values (a permutation) spaced well above $\epsilon$.
    Ties go to the first entry in window order (row-major), as in PyTorch.

    Cache: the arg-max of each output as the index of its kernel offset
    (one byte per output) and the input's shape. With numba (:mod:`mnn.jit`)
    (1) is one compiled pass over the windows and (2) one over the outputs;
    both read a channels-last input in its own memory order and return the
    gradient in it.
    """

    def forward(self, x):
        planes, Ho, Wo, views, channels_last = _windows(self, x, -xp.inf)
        N, C = x.shape[:2]
        if jit.usable(planes):  # one compiled pass over the windows: Eq. (1)
            y = xp.empty(views[0].shape, dtype=x.dtype)
            argmax = xp.empty(y.shape, dtype=xp.uint8)
            _max_pool_kernel(planes, *self.kernel_size, *self.stride, *self.padding, y, argmax)
        else:
            y = views[0].copy()  # Eq. (1)
            argmax = xp.zeros(y.shape, dtype=xp.uint8)
            for k, view in enumerate(views[1:], start=1):
                larger = view > y  # strict: the first maximum wins ties
                xp.copyto(y, view, where=larger)  # Eq. (1)
                xp.copyto(argmax, xp.uint8(k), where=larger)  # Eq. (1)
        self.cache = (argmax, x.shape, channels_last)
        return _unplanes(y, N, C, channels_last)

    def backward(self, dy):
        argmax, shape, channels_last = self.pop_cache()
        N, C = shape[:2]
        check_output_grad(self, dy, (N, C, *argmax.shape[1:3]))
        g = _planes(dy, channels_last)  # the layout of the forward input (a view when dy has it)
        if jit.usable(g, argmax):  # one compiled pass: Eq. (2)
            (kH, kW), (sH, sW), (H, W) = self.kernel_size, self.stride, shape[2:]
            tiled = (kH, kW) == (sH, sW) and self.padding == (0, 0) and H % kH == 0 and W % kW == 0
            allocate = xp.empty if tiled else xp.zeros  # tiled windows: the kernel writes every entry
            dx = allocate((argmax.shape[0], H, W, argmax.shape[3]), dtype=dy.dtype)
            _max_pool_backward_kernel(g, argmax, kH, kW, sH, sW, *self.padding, tiled, dx)
            return _unplanes(dx, N, C, channels_last)
        count = self.kernel_size[0] * self.kernel_size[1]
        return _scatter(self, shape, g, (g * (argmax == k) for k in range(count)), channels_last)  # Eq. (2)


@jit.kernel
def _max_pool_kernel(x, kH, kW, sH, sW, pH, pW, y, argmax):
    """MaxPool2d Eq. (1) on ``(A, H, W, B)`` planes: each window's maximum and the offset ``k = u k_W + v`` of its
    first occurrence (padding counts as -inf, as the numpy path's; a NaN in the first entry stays, as there)."""
    A, H, W, B = x.shape
    Ho, Wo = y.shape[1], y.shape[2]
    for a in range(A):
        for i in range(Ho):
            for j in range(Wo):
                for k in range(kH * kW):
                    h, w = i * sH - pH + k // kW, j * sW - pW + k % kW
                    inside = 0 <= h < H and 0 <= w < W
                    for b in range(B):
                        value = x[a, h, w, b] if inside else -numpy.inf
                        if k == 0 or value > y[a, i, j, b]:  # strict: the first maximum wins ties
                            y[a, i, j, b] = value  # Eq. (1)
                            argmax[a, i, j, b] = k  # Eq. (1)


@jit.kernel
def _max_pool_backward_kernel(dy, argmax, kH, kW, sH, sW, pH, pW, tiled, dx):
    """MaxPool2d Eq. (2): add each output's gradient to its window's arg-max in ``dx`` ``(A, H, W, B)``, zeros;
    or, when the windows ``tiled`` the input exactly (stride = kernel, no padding), write every entry of an
    empty ``dx``: the gradient at the arg-max, 0 elsewhere (one pass, no separate zeroing)."""
    A, Ho, Wo, B = dy.shape
    H, W = dx.shape[1], dx.shape[2]
    for a in range(A):
        for i in range(Ho):
            for j in range(Wo):
                if tiled:
                    for k in range(kH * kW):
                        h, w = i * sH + k // kW, j * sW + k % kW
                        for b in range(B):
                            dx[a, h, w, b] = dy[a, i, j, b] if argmax[a, i, j, b] == k else 0.0  # Eq. (2)
                    continue
                for b in range(B):
                    k = argmax[a, i, j, b]
                    h, w = i * sH - pH + k // kW, j * sW - pW + k % kW
                    if 0 <= h < H and 0 <= w < W:  # a padding arg-max's gradient is dropped
                        dx[a, h, w, b] += dy[a, i, j, b]  # Eq. (2)


class AvgPool2d(_Pool2d):
    r"""The mean of each $k_H \times k_W$ window; zero padding counts in the mean (PyTorch's ``count_include_pad=True``).

    Forward:

    $$
    y_{ij} = \frac{1}{k_H k_W} \sum_{(h,w) \in \mathcal{W}_{ij}} \tilde x_{hw}. \tag{1}
    $$

    Backward. $\partial y_{ij} / \partial x_{hw} = \mathbb{1}[(h,w) \in \mathcal{W}_{ij}] / (k_H k_W)$, so

    $$
    \frac{\partial L}{\partial x_{hw}} = \frac{1}{k_H k_W} \sum_{i,j\,:\,(h,w) \in \mathcal{W}_{ij}} g_{ij}, \tag{2}
    $$

    one strided add of $g / (k_H k_W)$ per kernel offset. Cache: the input's shape only.
    """

    def forward(self, x):
        _, Ho, Wo, views, channels_last = _windows(self, x, 0.0)
        y = views[0].copy()
        for view in views[1:]:
            y += view  # Eq. (1)
        y *= x.dtype.type(1.0 / len(views))  # Eq. (1)
        self.cache = (x.shape, (*x.shape[:2], Ho, Wo), channels_last)
        return _unplanes(y, *x.shape[:2], channels_last)

    def backward(self, dy):
        shape, out_shape, channels_last = self.pop_cache()
        check_output_grad(self, dy, out_shape)
        count = self.kernel_size[0] * self.kernel_size[1]
        part = _planes(dy, channels_last) * dy.dtype.type(1.0 / count)  # Eq. (2)
        return _scatter(self, shape, part, [part] * count, channels_last)  # Eq. (2)


class AdaptiveAvgPool2d(Module):
    r"""Average over bins that split $H$ and $W$ into ``output_size`` parts, as PyTorch's; 1 is global average pooling.

    Forward. Output row $i$ of $H_o$ averages input rows $\lfloor iH/H_o \rfloor$
    to $\lceil (i+1)H/H_o \rceil - 1$ (and likewise columns), a bin
    $\mathcal{B}_{ij}$ of $|\mathcal{B}_{ij}|$ entries:

    $$
    y_{ij} = \frac{1}{|\mathcal{B}_{ij}|} \sum_{(h,w) \in \mathcal{B}_{ij}} x_{hw}. \tag{1}
    $$

    Backward, as for :class:`AvgPool2d`:

    $$
    \frac{\partial L}{\partial x_{hw}} = \sum_{i,j\,:\,(h,w) \in \mathcal{B}_{ij}} \frac{g_{ij}}{|\mathcal{B}_{ij}|}. \tag{2}
    $$

    With ``output_size=1`` (the global average pool ending most CNNs) (1) is
    one mean over $H, W$ and (2) a broadcast of $g / (HW)$. Other sizes loop
    over the $H_o W_o$ bins (few: bins differ in size, so there are no
    common strided views). Cache: the input's shape.
    """

    def __init__(self, output_size) -> None:
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        if min(self.output_size) < 1:
            raise ValueError(f"AdaptiveAvgPool2d: output_size must be positive, got {output_size!r}")

    def _bins(self, size: int, out: int):
        return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]

    def forward(self, x):
        check_input(self, x, ndim=4)
        N, C, H, W = x.shape
        Ho, Wo = self.output_size
        if self.output_size == (1, 1):
            y = xp.mean(x, axis=(2, 3), keepdims=True)  # Eq. (1)
        else:
            y = xp.empty((N, C, Ho, Wo), dtype=x.dtype)
            for i, (h0, h1) in enumerate(self._bins(H, Ho)):
                for j, (w0, w1) in enumerate(self._bins(W, Wo)):
                    y[:, :, i, j] = xp.mean(x[:, :, h0:h1, w0:w1], axis=(2, 3))  # Eq. (1)
        self.cache = x.shape
        return y

    def backward(self, dy):
        N, C, H, W = shape = self.pop_cache()
        Ho, Wo = self.output_size
        check_output_grad(self, dy, (N, C, Ho, Wo))
        if self.output_size == (1, 1):
            return xp.broadcast_to(dy * dy.dtype.type(1.0 / (H * W)), shape).copy()  # Eq. (2)
        dx = xp.zeros(shape, dtype=dy.dtype)
        for i, (h0, h1) in enumerate(self._bins(H, Ho)):
            for j, (w0, w1) in enumerate(self._bins(W, Wo)):
                area = (h1 - h0) * (w1 - w0)
                dx[:, :, h0:h1, w0:w1] += dy[:, :, i:i + 1, j:j + 1] * dy.dtype.type(1.0 / area)  # Eq. (2)
        return dx

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
