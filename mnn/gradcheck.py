r"""Finite-difference gradient checking, for mnn's layers and for yours.

For a layer $y = f(x; \theta)$ and a fixed random upstream gradient $g$, the
scalar $L = \sum g \odot f(x;\theta)$ has $\partial L / \partial x$ equal to the
vector-Jacobian product that ``backward(g)`` returns. Each input and parameter
element is perturbed by $\pm\epsilon$ and the central difference

$$
\frac{\partial L}{\partial x_i} \approx \frac{L(x + \epsilon e_i) - L(x - \epsilon e_i)}{2\epsilon}
$$

is compared with the analytic value (error $O(\epsilon^2)$). Run it in float64.
"""

from __future__ import annotations

import numpy

from mnn.backend import to_numpy, xp
from mnn.errors import MnnError


class GradcheckError(MnnError, AssertionError):
    """The analytic gradient disagrees with the finite-difference one."""


def _relative_error(analytic, numeric) -> float:
    """``||a - n|| / max(||a||, ||n||)``: 0 when both vanish."""
    a, n = to_numpy(analytic).ravel(), to_numpy(numeric).ravel()
    scale = max(numpy.linalg.norm(a), numpy.linalg.norm(n))
    return 0.0 if scale == 0 else float(numpy.linalg.norm(a - n) / scale)


def _is_float(array) -> bool:
    return hasattr(array, "dtype") and xp.issubdtype(array.dtype, xp.floating)


def gradcheck(layer, inputs, upstream=None, eps: float = 1e-6, tol: float = 1e-7,
              seed: int = 0, before_forward=None, raise_on_failure: bool = True) -> dict:
    """Compare ``layer.backward`` with central finite differences.

    Args:
        layer: a :class:`~mnn.module.Module`; its parameters should be float64.
        inputs: the positional inputs of ``forward`` (a tuple, or one array).
            Floating arrays are checked; integer ones (labels, token ids) are held fixed.
        upstream: the gradient fed to ``backward``; random normal of the output's shape if omitted.
        eps: the finite-difference step.
        tol: the largest relative error accepted.
        seed: seeds the random upstream gradient.
        before_forward: called before every forward (e.g. to reseed a Dropout mask).
        raise_on_failure: raise :class:`GradcheckError` when an error exceeds ``tol``.

    Returns:
        ``{name: relative error}`` for each floating input (``"input0"``, ...)
        and each parameter (its dotted name).
    """
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    inputs = tuple(inputs)

    def run():
        if before_forward is not None:
            before_forward()
        return layer.forward(*inputs)

    out = run()
    rng = numpy.random.default_rng(seed)
    if upstream is None:
        upstream = xp.asarray(rng.standard_normal(numpy.shape(out)), dtype=xp.float64)

    def objective() -> float:
        value = float(xp.sum(xp.asarray(run(), dtype=xp.float64) * upstream))
        layer.release_caches()
        return value

    layer.zero_grad()
    run()
    dx = layer.backward(upstream)
    if not isinstance(dx, tuple):
        dx = (dx,)
    analytic = {f"input{i}": g for i, (x, g) in enumerate(zip(inputs, dx)) if _is_float(x) and g is not None}
    targets = {f"input{i}": x for i, x in enumerate(inputs) if f"input{i}" in analytic}
    for (name, param), (_, grad) in zip(layer.named_parameters(), layer.named_grads()):
        analytic[name] = grad.copy()
        targets[name] = param

    errors = {}
    for name, array in targets.items():
        if not array.flags.c_contiguous:  # perturbing a reshaped copy would change nothing
            raise ValueError(f"gradcheck: {name} must be C-contiguous (use numpy.ascontiguousarray)")
        numeric = xp.zeros(array.shape, dtype=xp.float64)
        flat, numeric_flat = array.reshape(-1), numeric.reshape(-1)
        for i in range(flat.size):
            saved = flat[i].copy()
            flat[i] = saved + eps
            plus = objective()
            flat[i] = saved - eps
            minus = objective()
            flat[i] = saved
            numeric_flat[i] = (plus - minus) / (2 * eps)
        errors[name] = _relative_error(analytic[name], numeric)

    worst = {k: v for k, v in errors.items() if v > tol}
    if worst and raise_on_failure:
        listing = ", ".join(f"{k}: {v:.2e}" for k, v in worst.items())
        raise GradcheckError(f"{layer!r}: gradient check failed (tol {tol:.0e}): {listing}")
    return errors
