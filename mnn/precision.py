r"""Mixed precision: matrix products in bfloat16 or float16 with float32 accumulation, float32 everywhere else.

``set_compute_dtype("bf16" | "fp16")`` (``mnn train gpt --dtype``) changes
what :class:`~mnn.layers.Linear` and :class:`~mnn.layers.MatrixProduct`
compute, as ``torch.autocast`` does for ``linear`` and ``matmul``; everything
else stays as it is. The default, ``"float32"``, leaves every layer on its
float32 path, bit for bit.

**What is low, what stays float32.** The parameters (master weights), their
gradients and the optimizer's moments stay float32. A product's operands are
rounded to the low format $\mathbb{F}$ (bf16: 8 significant bits; fp16:
11), multiplied with float32 accumulation, and the product rounded to
$\mathbb{F}$, as autocast's bf16 output; it is held in a float32 array (numpy
has no bf16 product). Softmax, LayerNorm's statistics, the loss and the
gradient norm read those values and compute in float32, as under autocast.
A product's inputs kept for its backward are stored in the low format (2
bytes an element instead of 4; on the CPU as ``ml_dtypes.bfloat16`` or
``numpy.float16``): the layer's cache is half the size.

**Why the CPU path is exact.** Let $\mathrm{rd}(\cdot)$ round to
$\mathbb{F}$ with $p$ significant bits ($p = 8$ for bf16, $11$ for fp16). Two
numbers of $\mathbb{F}$ have $p$-bit significands, so their product has at
most $2p \le 24$ significant bits and is exact in float32; the float32 GEMM
on rounded operands therefore computes

$$
D = \mathrm{fl}_{32}\Big( \sum_k \mathrm{rd}(Q_{ik})\, \mathrm{rd}(P_{kj}) \Big), \tag{1}
$$

exactly what a bf16 (or fp16) tensor-core product with float32 accumulation
computes, up to the order of the sum.

**Rounding error of one product.** With $u = 2^{-p}$ (bf16: $2^{-8}$, fp16:
$2^{-11}$) each operand is $\mathrm{rd}(x) = x(1 + \delta)$,
$|\delta| \le u$, so each term is $Q_{ik} P_{kj} (1 + \delta_1)(1 + \delta_2)$
with $|(1+\delta_1)(1+\delta_2) - 1| \le 2u + u^2$. The float32 sum of $K$
terms adds at most $\gamma_K = K u_{32} / (1 - K u_{32})$ relative to the sum
of magnitudes ($u_{32} = 2^{-24}$), and the final rounding of $D$ one more
$u$:

$$
\big| \hat D_{ij} - D_{ij} \big| \le \big( (2u + u^2)(1 + \gamma_K) + \gamma_K \big)
\sum_k |Q_{ik}|\,|P_{kj}| \;+\; u\, |D_{ij}|. \tag{2}
$$

For bf16 and $K = 384$ (the GPU recipe's width) the first factor is about
$2^{-7} = 7.8 \times 10^{-3}$; the error relative to
$\sum_k |Q_{ik} P_{kj}|$ is below $1.2\%$ however the terms cancel, and
typically far smaller (the $\delta$ are independent: about $u \sqrt{2}$ in
the root mean square). ``tests/test_precision.py`` checks (2) on random
products and the GPT's forward and backward against ``torch.autocast``.

**Loss scaling (fp16).** float16 has a small range (largest 65504, smallest
normal $6 \times 10^{-5}$): small gradients underflow. :class:`GradScaler`
multiplies the upstream gradient of the loss by $S$ (initially $2^{16}$),
divides the gradients by $S$ before the norm and the update, and when any
gradient is not finite skips the step and halves $S$; after 2000 finite steps
in a row it doubles $S$ (``torch.amp.GradScaler``'s defaults). bf16 has
float32's range and needs none.
"""

from __future__ import annotations

import numpy

from mnn import backend
from mnn.backend import xp

NAMES = ("float32", "bf16", "fp16")
_compute = "float32"


def set_compute_dtype(name: str) -> None:
    """Choose the matrix products' precision: ``"float32"`` (default), ``"bf16"`` or ``"fp16"``.

    Raises:
        ValueError: for another name, or ``"bf16"`` on the CPU without the ``ml_dtypes`` package.
    """
    global _compute
    if name not in NAMES:
        raise ValueError(f"unknown compute dtype {name!r}: expected one of {', '.join(NAMES)}")
    if name == "bf16" and backend.on_cpu():
        _low_dtype("bf16")  # fails now, with the install hint, rather than in the first product
    _compute = name


def compute_dtype() -> str:
    """The matrix products' precision: ``"float32"``, ``"bf16"`` or ``"fp16"``."""
    return _compute


def active() -> bool:
    """Whether products run in a low precision (anything but ``"float32"``)."""
    return _compute != "float32"


def _low_dtype(name: str):
    if name == "fp16":
        return numpy.float16
    try:
        import ml_dtypes  # noqa: PLC0415 - optional: only bf16 on the CPU needs it
    except ImportError as error:
        raise ValueError("bf16 on the CPU needs the ml_dtypes package: pip install 'manual-nn[bf16]'") from error
    return ml_dtypes.bfloat16


def store(array):
    """``array`` in the low format, for a cache: 2 bytes an element (float32 values rounded to nearest even)."""
    if backend.on_cpu() or _compute == "fp16":
        return array.astype(_low_dtype(_compute))
    return _bf16_bits(array)  # the GPU (CuPy has no bfloat16): the top 16 bits of the rounded float32


def load(stored):
    """A stored low-format array as float32 (exact: every value of the low format is a float32)."""
    if stored.dtype == xp.uint16:
        return (stored.astype(xp.uint32) << 16).view(xp.float32)
    return stored.astype(xp.float32)


def rounded(array):
    r"""``array`` (float32) with its values rounded to the low format, still float32: $\mathrm{rd}(x)$ of Eq. (1)."""
    return load(store(array))


def _bf16_bits(array):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    bits = xp.ascontiguousarray(array, dtype=xp.float32).view(xp.uint32)
    rounding = xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1))
    top = ((bits + rounding) >> 16).astype(xp.uint16)
    return xp.where(xp.isnan(array), xp.uint16(0x7FC0), top)


def matmul(a, b, out=None):
    r"""$\mathrm{rd}(\mathrm{rd}(A)\,\mathrm{rd}(B))$: Eq. (1), rounded to the low format as autocast's output; float32.

    ``a`` and ``b`` may be stored arrays (:func:`store`) or float32 ones.
    """
    a = load(a) if a.dtype.itemsize == 2 else rounded(a)
    b = load(b) if b.dtype.itemsize == 2 else rounded(b)
    product = rounded(xp.matmul(a, b))  # Eq. (1), then the output in the low format
    if out is None:
        return product
    out[...] = product
    return out


class GradScaler:
    r"""Dynamic loss scaling for fp16, as ``torch.amp.GradScaler``: scale up, unscale, skip on overflow.

    Args:
        scale: the initial factor $S$ ($2^{16}$).
        growth_interval: finite steps in a row after which $S$ doubles (2000).

    Use: the loss's upstream gradient is multiplied by :attr:`scale`
    (:class:`ScaledLoss`); :meth:`unscale` divides the gradients by it and
    says whether they are finite; :meth:`update` halves $S$ after an overflow
    (the step is skipped: :meth:`guard`) and doubles it after
    ``growth_interval`` good steps.
    """

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale, self.growth_interval = float(scale), int(growth_interval)
        self.good_steps, self.skipped = 0, 0
        self.found_inf = False

    def unscale(self, grads) -> None:
        """Divide every gradient by :attr:`scale`, in place (before the norm and the update)."""
        inverse = 1.0 / self.scale
        for grad in grads:
            grad *= inverse

    def update(self, finite: bool) -> None:
        """After a step: halve the scale on an overflow (the step is skipped), double it after enough good steps."""
        self.found_inf = not finite
        if self.found_inf:
            self.scale *= 0.5
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    def guard(self, optimizer):
        """Make ``optimizer.step()`` do nothing after an overflow (as ``GradScaler.step``); returns the optimizer."""
        step = optimizer.step

        def guarded_step(*args, zero_grad: bool = False, **kwargs):
            if self.found_inf:  # no update; the gradients are still zeroed when asked
                if zero_grad:
                    optimizer.zero_grad()
                return None
            return step(*args, zero_grad=zero_grad, **kwargs)

        optimizer.step = guarded_step
        return optimizer

    def state(self) -> dict:
        """What a checkpoint keeps to resume the scaling exactly."""
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.skipped = int(state.get("skipped", 0))


class ScaledLoss:
    """A loss whose backward starts from ``dloss * scaler.scale`` (fp16 loss scaling); forward unchanged.

    Copies (one per replica of :class:`~mnn.parallel.DataParallel`) share the scaler.
    """

    def __init__(self, loss, scaler: GradScaler) -> None:
        self.loss, self.scaler = loss, scaler

    def forward(self, *inputs):
        return self.loss.forward(*inputs)

    __call__ = forward

    def backward(self, dloss=1.0):
        return self.loss.backward(float(dloss) * self.scaler.scale)

    def __deepcopy__(self, memo):
        import copy  # noqa: PLC0415

        return ScaledLoss(copy.deepcopy(self.loss, memo), self.scaler)
