r"""Finite-difference gradient checking, for mnn's layers and for yours.

For a layer $y = f(x; \theta)$ and a fixed random upstream gradient $g$, the
scalar $L = \sum g \odot f(x;\theta)$ has $\partial L / \partial x$ equal to the
vector-Jacobian product that ``backward(g)`` returns. Each input and parameter
element is perturbed by $\pm\epsilon$ and the central difference

$$
\frac{\partial L}{\partial x_i} \approx \frac{L(x + \epsilon e_i) - L(x - \epsilon e_i)}{2\epsilon}
$$

is compared with the analytic value (error $O(\epsilon^2)$). Run it in float64.

It also holds ``backward`` to the rest of the layer contract: parameter
gradients are accumulated in place, every gradient has its array's shape,
and everything is float64 (see :func:`gradcheck`).
"""

from __future__ import annotations

import numpy

from mnn.backend import to_numpy, xp
from mnn.errors import MnnError, ShapeError


class GradcheckError(MnnError, AssertionError):
    """The analytic gradient disagrees with the finite-difference one."""


def _relative_error(analytic, numeric) -> float:
    """``||a - n|| / max(||a||, ||n||)``: 0 when both vanish."""
    a, n = to_numpy(analytic).ravel(), to_numpy(numeric).ravel()
    scale = max(numpy.linalg.norm(a), numpy.linalg.norm(n))
    return 0.0 if scale == 0 else float(numpy.linalg.norm(a - n) / scale)


def _is_float(array) -> bool:
    return hasattr(array, "dtype") and xp.issubdtype(array.dtype, xp.floating)


def _require_float64(layer, inputs, upstream) -> None:
    """Refuse anything floating that is not float64, naming it and how to build it in float64."""
    params = [(name, str(param.dtype)) for name, param in layer.named_parameters()
              if _is_float(param) and param.dtype != xp.float64]
    if params:
        dtypes = " and ".join(sorted({dtype for _, dtype in params}))
        raise ShapeError(f"gradcheck needs float64: the parameters of {layer!r} are {dtypes} "
                         f"({', '.join(name for name, _ in params)}); build it with dtype=numpy.float64, "
                         "or after mnn.set_default_dtype(numpy.float64)")
    arrays = [(f"input{i}", x) for i, x in enumerate(inputs) if _is_float(x)] + [("upstream", upstream)]
    for name, array in arrays:
        if _is_float(array) and array.dtype != xp.float64:
            raise ShapeError(f"gradcheck needs float64: {name} is {array.dtype}; pass it as array.astype(numpy.float64)")


def _check_shape(layer, name: str, gradient, wanted) -> None:
    """Refuse a gradient whose shape is not that of what it differentiates, naming the layer and both shapes."""
    got = tuple(getattr(gradient, "shape", ()))
    if got != tuple(wanted.shape):
        raise GradcheckError(f"{layer!r}: the gradient of {name} has shape {got}, but {name} has shape "
                             f"{tuple(wanted.shape)}")


def gradcheck(layer, inputs, upstream=None, eps: float = 1e-6, tol: float = 1e-7,
              seed: int = 0, before_forward=None, raise_on_failure: bool = True) -> dict:
    r"""Compare ``layer.backward`` with central finite differences, and check that it accumulates.

    Besides the values, the check holds ``backward`` to the rest of the layer
    contract (:mod:`mnn.module`):

    * **accumulation**: each parameter's gradient is pre-filled with a random
      array $P$ and ``backward`` runs again; it must leave
      $P + \partial L / \partial \theta$ in the same array (``self.grads[k] += ...``). A
      backward that assigns instead (``self.grads[k] = ...``) would drop the
      gradients of earlier micro-batches and of tied weights; one that binds a
      new array would leave the optimizer, which holds the old one, unchanged.
      Either fails, naming the parameter by its dotted name;
    * **shapes**: every returned input gradient and every parameter gradient
      has the shape of what it differentiates, else the error names the layer,
      the input or parameter, and both shapes;
    * **float64**: finite differences in float32 cannot reach ``tol``. A
      float32 parameter, input or ``upstream`` is refused up front with a
      :class:`~mnn.errors.ShapeError` that names it and says how to build the
      layer in float64.

    Args:
        layer: a :class:`~mnn.module.Module` whose parameters are float64.
        inputs: the positional inputs of ``forward`` (a tuple, or one array).
            Floating arrays (float64) are checked; integer ones (labels, token ids) are held fixed.
        upstream: the gradient fed to ``backward``; random normal of the output's shape if omitted.
        eps: the finite-difference step.
        tol: the largest relative error accepted.
        seed: seeds the random upstream gradient and the pre-filled gradients.
        before_forward: called before every forward (e.g. to reseed a Dropout mask).
        raise_on_failure: raise :class:`GradcheckError` when an error exceeds ``tol``.

    Returns:
        ``{name: relative error}`` for each floating input (``"input0"``, ...)
        and each parameter (its dotted name); with ``raise_on_failure=False``,
        also ``"<name> (accumulation)"`` for each parameter whose gradient did
        not accumulate.

    Raises:
        GradcheckError: ``Scale(): gradient check failed (tol 1e-07): w (accumulation): 1.00e+00 ...``,
            or a gradient of the wrong shape: ``Tanh(): the gradient of input0 has shape (4,),
            but input0 has shape (3, 4)``.
        ShapeError: ``gradcheck needs float64: the parameters of Linear(4, 3, bias=True) are float32
            (weight, bias); build it with dtype=numpy.float64, or after mnn.set_default_dtype(numpy.float64)``;
            likewise for an input (``input1 is float32``) or ``upstream``.
    """
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    inputs = tuple(xp.asarray(x) if isinstance(x, numpy.ndarray) else x for x in inputs)  # host arrays: to the device
    if isinstance(upstream, numpy.ndarray):
        upstream = xp.asarray(upstream)
    _require_float64(layer, inputs, upstream)

    def run():
        if before_forward is not None:
            before_forward()
        return layer.forward(*inputs)

    out = run()
    rng = numpy.random.default_rng(seed)
    if upstream is None:
        if _is_float(out) and out.dtype != xp.float64:
            raise ShapeError(f"gradcheck needs float64: {layer!r} returned {out.dtype} from float64 inputs "
                             "and parameters")
        upstream = xp.asarray(rng.standard_normal(out.shape), dtype=xp.float64)

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
    for name, gradient in analytic.items():
        _check_shape(layer, name, gradient, targets[name])

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
    errors.update(_accumulation_errors(layer, run, upstream, analytic, rng, tol))

    worst = {k: v for k, v in errors.items() if v > tol}
    if worst and raise_on_failure:
        listing = ", ".join(f"{k}: {v:.2e}" for k, v in worst.items())
        hint = (" (backward must add into the gradient in place: self.grads[k] += ..., not self.grads[k] = ...)"
                if any(k.endswith(" (accumulation)") for k in worst) else "")
        raise GradcheckError(f"{layer!r}: gradient check failed (tol {tol:.0e}): {listing}{hint}")
    return errors


def _accumulation_errors(layer, run, upstream, analytic: dict, rng, tol: float) -> dict:
    r"""Pre-fill every parameter gradient with $P$, backpropagate, and compare what is left with $P + g$.

    The error is $\lVert G - (P + g) \rVert / \max(\lVert P + g \rVert, \lVert P \rVert)$
    for the gradient $G$ that ``backward`` leaves: rounding alone (about
    $10^{-16}$) when it adds, about 1 when it assigns, since $P$ is scaled
    to the size of $g$. Returns ``{"<name> (accumulation)": error}`` for the
    parameters above ``tol``, and 1 for those whose gradient ``backward``
    replaced by a new array. Leaves every gradient equal to ``analytic``
    again, as after a plain check.
    """
    before = layer.named_grads()
    prefill = {}
    for name, grad in before:
        scale = max(1.0, float(xp.max(xp.abs(analytic[name])))) if grad.size else 1.0
        prefill[name] = xp.asarray(rng.standard_normal(grad.shape) * scale, dtype=grad.dtype)
        grad[...] = prefill[name]
    run()
    layer.backward(upstream)
    errors = {}
    for (name, old), (_, new) in zip(before, layer.named_grads()):
        if new is not old:  # a new array: the optimizer, which holds the old one, would see nothing
            errors[f"{name} (accumulation)"] = 1.0
            continue
        expected = prefill[name] + analytic[name]
        scale = max(float(xp.linalg.norm(expected)), float(xp.linalg.norm(prefill[name])))
        error = 0.0 if scale == 0 else float(xp.linalg.norm(new - expected)) / scale
        if error > tol:
            errors[f"{name} (accumulation)"] = error
        new[...] = analytic[name]
    return errors
