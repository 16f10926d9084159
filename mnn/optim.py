r"""Optimizers (SGD, Adam, AdamW) and global gradient-norm clipping.

An optimizer holds *references* to the parameter and gradient arrays of a
model and updates the parameters **in place** (other code holds the same
arrays: nothing is ever rebound). Parameters come in groups, as in PyTorch:

* ``SGD(model, lr=0.1)``: every parameter of ``model``, one group;
* ``AdamW(param_groups(model, weight_decay=0.1), lr=6e-4)``: the nanoGPT split,
  decay on tensors with ``ndim >= 2`` only.

A group is a dict ``{"params": [(name, param, grad), ...], **overrides}``
where the overrides (``"lr"``, ``"weight_decay"``, ...) replace the
optimizer's defaults for that group. Per-parameter state (moments, momentum)
is preallocated at construction, keyed by the parameter's dotted name, and
saved flat by :meth:`Optimizer.state_dict` (``"step"``,
``"exp_avg.<name>"``, ``"exp_avg_sq.<name>"``, ``"momentum.<name>"``), ready
for ``safetensors``.

Numerics: updates run in the parameter's dtype (hyper-parameters are Python
floats, which NumPy 2 does not let promote float32 to float64), with in-place
ufuncs (``out=``, ``*=``) and two scratch buffers shared by all parameters of
a dtype, so a step allocates no parameter-sized temporaries. With numba
installed (:mod:`mnn.jit`), SGD and Adam(W) run the same equations as one
compiled loop per parameter instead: one pass over memory where numpy takes
four (SGD with momentum) or fifteen (Adam).
"""

from __future__ import annotations

import math

import numpy

from mnn import jit
from mnn.backend import to_numpy, xp
from mnn.errors import ShapeError
from mnn.module import Module, check_state


def param_groups(model: Module, weight_decay: float) -> list[dict]:
    """The nanoGPT split: weight decay on tensors with ``ndim >= 2``, none on the rest.

    Matrices (linear and embedding weights) decay; vectors (biases, LayerNorm
    gains and shifts) do not. Tied weights appear once.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay},
        {"params": others, "weight_decay": 0.0}]``, each ``params`` a list of
        ``(name, param, grad)`` triples in the model's order.
    """
    decay, no_decay = [], []
    for (name, param), (_, grad) in zip(model.named_parameters(), model.named_grads()):
        (decay if param.ndim >= 2 else no_decay).append((name, param, grad))
    return [{"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0}]


class Optimizer:
    """Base class: parameter groups, preallocated state, ``step``/``zero_grad``/state dicts.

    Subclasses set ``defaults`` (hyper-parameter name -> default value) through
    ``__init__``, list their per-parameter buffers in :meth:`buffer_names` and
    implement :meth:`update`, which changes one parameter in place.

    Attributes:
        groups: list of group dicts, each ``{"params": [(name, param, grad), ...]}``
            plus every hyper-parameter (defaults filled in).
        state: ``{param name: {buffer name: array}}``, arrays shaped and typed
            like the parameter.
        step_count: number of :meth:`step` calls so far ($t$ in the formulas).
    """

    def __init__(self, params, defaults: dict) -> None:
        self.defaults = dict(defaults)
        self.groups = [self._make_group(group, index) for index, group in enumerate(_as_groups(params))]
        names, arrays = set(), set()
        for group in self.groups:
            self._check_hyper_parameters(group)
            for name, param, _ in group["params"]:
                if name in names or id(param) in arrays:
                    raise ValueError(f"{type(self).__name__}: parameter {name!r} appears in more than one place")
                names.add(name)
                arrays.add(id(param))
        self.step_count = 0
        self.state = {}
        self._scratch = {}
        sizes: dict = {}
        for group in self.groups:
            for name, param, _ in group["params"]:
                self.state[name] = {buffer: xp.zeros_like(param) for buffer in self.buffer_names(group)}
                sizes[param.dtype] = max(sizes.get(param.dtype, 0), int(param.size))
        flat = {dtype: (xp.empty(size, dtype=dtype), xp.empty(size, dtype=dtype)) for dtype, size in sizes.items()}
        for group in self.groups:
            for name, param, _ in group["params"]:
                first, second = flat[param.dtype]
                self._scratch[name] = (first[: param.size].reshape(param.shape),
                                       second[: param.size].reshape(param.shape))

    def _make_group(self, group: dict, index: int) -> dict:
        unknown = sorted(set(group) - set(self.defaults) - {"params"})
        if unknown:
            raise ValueError(f"{type(self).__name__}: group {index} has unknown keys {unknown}; "
                             f"expected 'params' and any of {sorted(self.defaults)}")
        triples = []
        for triple in group["params"]:
            name, param, grad = triple
            if tuple(grad.shape) != tuple(param.shape) or grad.dtype != param.dtype:
                raise ShapeError(f"{type(self).__name__}: gradient of {name!r} is {grad.dtype}{tuple(grad.shape)}, "
                                 f"parameter is {param.dtype}{tuple(param.shape)}")
            triples.append((str(name), param, grad))
        made = {"params": triples}
        for key, default in self.defaults.items():
            value = group.get(key, default)
            if isinstance(default, bool):
                made[key] = bool(value)
            elif isinstance(default, tuple):
                made[key] = tuple(float(item) for item in value)
            else:
                made[key] = float(value)
        return made

    def _check_hyper_parameters(self, group: dict) -> None:
        if group["lr"] < 0.0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {group['lr']}")
        if group["weight_decay"] < 0.0:
            raise ValueError(f"{type(self).__name__}: weight_decay must be >= 0, got {group['weight_decay']}")

    # -- what subclasses provide ------------------------------------------
    def buffer_names(self, group: dict) -> tuple[str, ...]:
        """Names of the per-parameter state buffers of a parameter in ``group``."""
        return ()

    def update(self, group: dict, param, grad, state: dict, scratch: tuple) -> None:
        """Change ``param`` in place from ``grad`` and its ``state`` (step $t$ = ``self.step_count``)."""
        raise NotImplementedError

    # -- the public methods -----------------------------------------------
    def step(self) -> None:
        """Apply one update to every parameter, from the gradients accumulated so far."""
        self.step_count += 1
        for group in self.groups:
            for name, param, grad in group["params"]:
                self.update(group, param, grad, self.state[name], self._scratch[name])

    def zero_grad(self) -> None:
        """Set every gradient array this optimizer updates from to zero, in place."""
        for _, _, grad in _all_triples(self.groups):
            grad.fill(0)

    @property
    def lr(self) -> float:
        """The learning rate of the first group (setting it sets every group's)."""
        return self.groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        value = float(value)
        if not value >= 0.0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {value}")
        for group in self.groups:
            group["lr"] = value

    def state_dict(self) -> dict:
        """The optimizer's state as flat host arrays: ``"step"`` (int64, shape ``()``) and
        ``"<buffer>.<param name>"`` copies, ready for ``safetensors.numpy.save_file``.

        Hyper-parameters are not included: they are the optimizer's
        configuration (and the learning rate comes from the schedule).
        """
        state = {"step": numpy.array(self.step_count, dtype=numpy.int64)}
        for name, buffers in self.state.items():
            for buffer, array in buffers.items():
                state[f"{buffer}.{name}"] = numpy.array(to_numpy(array), copy=True)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output, in place and strictly.

        Every entry is checked before anything changes, so a refused state
        dict leaves the optimizer untouched.

        Raises:
            CheckpointError: naming every missing, unexpected or mis-shaped entry
                (and a ``"step"`` that is not one non-negative integer).
        """
        own = {f"{buffer}.{name}": array for name, buffers in self.state.items() for buffer, array in buffers.items()}
        step, step_problems = None, []
        if "step" in state:
            value = to_numpy(xp.asarray(state["step"]))
            if value.size != 1 or not numpy.issubdtype(value.dtype, numpy.integer) or int(value.reshape(-1)[0]) < 0:
                step_problems.append(f"step: expected one non-negative integer, got {value.dtype}{tuple(value.shape)}")
            else:
                step = int(value.reshape(-1)[0])
        check_state(type(self).__name__, own, state, shape_free=("step",), other_problems=step_problems)
        for key, array in own.items():
            array[...] = xp.asarray(state[key], dtype=array.dtype)
        self.step_count = step

    def __repr__(self) -> str:
        groups = ", ".join(
            f"{len(g['params'])} params " + " ".join(f"{k}={g[k]}" for k in self.defaults) for g in self.groups)
        return f"{type(self).__name__}([{groups}])"


def _as_groups(params) -> list[dict]:
    """A Module becomes one group of all its parameters; a list of group dicts stays as it is."""
    if isinstance(params, Module):
        named_params, named_grads = params.named_parameters(), params.named_grads()
        if [name for name, _ in named_params] != [name for name, _ in named_grads]:
            raise ValueError(f"{params!r}: named_parameters and named_grads disagree")
        return [{"params": [(name, p, g) for (name, p), (_, g) in zip(named_params, named_grads)]}]
    groups = list(params)
    if not groups or not all(isinstance(group, dict) and "params" in group for group in groups):
        raise ValueError("an optimizer takes a Module or a non-empty list of dicts "
                         "{'params': [(name, param, grad), ...]}")
    return groups


def _all_triples(groups: list[dict]):
    for group in groups:
        yield from group["params"]


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, Nesterov momentum and L2 decay.

    The update of PyTorch's ``torch.optim.SGD``, at step $t = 1, 2, \dots$ for a
    parameter $\theta$ with gradient $\nabla_\theta L$, learning rate $\eta$,
    weight decay $\lambda$, momentum $\mu$ and dampening $\tau$:

    $$
    g_t = \nabla_\theta L(\theta_{t-1}) + \lambda\, \theta_{t-1} \tag{1}
    $$

    $$
    b_1 = g_1, \qquad b_t = \mu\, b_{t-1} + (1 - \tau)\, g_t \quad (t > 1) \tag{2}
    $$

    $$
    d_t = g_t \;(\mu = 0), \qquad d_t = b_t \;(\text{momentum}), \qquad
    d_t = g_t + \mu\, b_t \;(\text{Nesterov}) \tag{3}
    $$

    $$
    \theta_t = \theta_{t-1} - \eta\, d_t \tag{4}
    $$

    The decay in (1) is L2 regularisation: it is the gradient of
    $\tfrac{\lambda}{2}\lVert\theta\rVert^2$ added to the loss.

    Args:
        params: a Module, or a list of groups ``{"params": [(name, param, grad), ...], **overrides}``.
        lr: $\eta$.
        momentum: $\mu$ (0 for plain SGD).
        nesterov: use the Nesterov form of (3); needs $\mu > 0$ and $\tau = 0$.
        weight_decay: $\lambda$.
        dampening: $\tau$.

    State: ``"momentum.<name>"`` ($b$, shaped like the parameter) when $\mu > 0$.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": bool(nesterov),
                                  "weight_decay": weight_decay, "dampening": dampening})

    def _check_hyper_parameters(self, group: dict) -> None:
        super()._check_hyper_parameters(group)
        if group["momentum"] < 0.0:
            raise ValueError(f"SGD: momentum must be >= 0, got {group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0.0 or group["dampening"] != 0.0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")

    def buffer_names(self, group: dict) -> tuple[str, ...]:
        return ("momentum",) if group["momentum"] != 0.0 else ()

    def update(self, group, param, grad, state, scratch) -> None:
        work, spare = scratch
        lr, mu, decay = group["lr"], group["momentum"], group["weight_decay"]
        buf = state["momentum"] if mu != 0.0 else work  # work: an unused stand-in when there is no momentum
        if jit.usable(param, grad, buf):
            real = param.dtype.type
            _sgd_kernel(jit.flat(param), jit.flat(grad), jit.flat(buf), real(lr), real(mu), real(decay),
                        real(1.0 - group["dampening"]), group["nesterov"], self.step_count == 1)
            return
        direction = grad
        if decay != 0.0:
            xp.multiply(param, decay, out=work)  # Eq. (1): lambda theta
            work += grad  # Eq. (1)
            direction = work
        if mu != 0.0:
            buf = state["momentum"]
            if self.step_count == 1:
                buf[...] = direction  # Eq. (2), t = 1
            else:
                buf *= mu  # Eq. (2)
                if group["dampening"] == 0.0:
                    buf += direction  # Eq. (2)
                else:
                    xp.multiply(direction, 1.0 - group["dampening"], out=spare)  # Eq. (2)
                    buf += spare  # Eq. (2)
            if group["nesterov"]:
                xp.multiply(buf, mu, out=spare)  # Eq. (3): mu b_t
                spare += direction  # Eq. (3)
                direction = spare
            else:
                direction = buf  # Eq. (3)
        xp.multiply(direction, lr, out=work)  # Eq. (4): eta d_t (work may alias direction)
        param -= work  # Eq. (4)


@jit.kernel
def _sgd_kernel(param, grad, buf, lr, mu, decay, keep, nesterov, first):
    r"""SGD's Eqs. (1)-(4) for one parameter, element by element (``keep`` = $1 - \tau$)."""
    for i in range(param.size):
        d = grad[i]
        if decay != 0.0:
            d = d + decay * param[i]  # Eq. (1)
        if mu != 0.0:
            if first:
                b = d  # Eq. (2), t = 1
            else:
                b = mu * buf[i] + keep * d  # Eq. (2)
            buf[i] = b
            if nesterov:
                d = d + mu * b  # Eq. (3)
            else:
                d = b  # Eq. (3)
        param[i] -= lr * d  # Eq. (4)


class Adam(Optimizer):
    r"""Adam with bias-corrected moments and optional L2 decay, as ``torch.optim.Adam``.

    At step $t = 1, 2, \dots$, with learning rate $\eta$, decay rates
    $\beta_1, \beta_2$, $\epsilon$ and weight decay $\lambda$ (all element-wise;
    $m_0 = v_0 = 0$):

    $$
    g_t = \nabla_\theta L(\theta_{t-1}) + \lambda\, \theta_{t-1} \tag{1}
    $$

    $$
    m_t = \beta_1\, m_{t-1} + (1 - \beta_1)\, g_t \tag{2}
    $$

    $$
    v_t = \beta_2\, v_{t-1} + (1 - \beta_2)\, g_t^2 \tag{3}
    $$

    $$
    \hat m_t = \frac{m_t}{1 - \beta_1^t}, \qquad \hat v_t = \frac{v_t}{1 - \beta_2^t} \tag{4}
    $$

    $$
    \theta_t = \theta_{t-1} - \eta\, \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} \tag{5}
    $$

    The code folds (4) into (5) the way PyTorch does, so $\epsilon$ is added
    to $\sqrt{\hat v_t}$ and not to $\sqrt{v_t}$:

    $$
    \theta_t = \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\,
    \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}. \tag{6}
    $$

    With $\lambda > 0$, (1) is L2 regularisation, which the adaptive scaling
    in (5) weakens for parameters with large gradients; :class:`AdamW`
    decouples it instead.

    Args:
        params: a Module, or a list of groups ``{"params": [(name, param, grad), ...], **overrides}``.
        lr: $\eta$.
        betas: $(\beta_1, \beta_2)$.
        eps: $\epsilon$.
        weight_decay: $\lambda$ of (1).

    State: ``"exp_avg.<name>"`` ($m$) and ``"exp_avg_sq.<name>"`` ($v$),
    shaped like the parameter.
    """

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": (float(betas[0]), float(betas[1])), "eps": eps,
                                  "weight_decay": weight_decay})

    def _check_hyper_parameters(self, group: dict) -> None:
        super()._check_hyper_parameters(group)
        beta1, beta2 = group["betas"]
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"{type(self).__name__}: betas must be in [0, 1), got {group['betas']}")
        if group["eps"] < 0.0:
            raise ValueError(f"{type(self).__name__}: eps must be >= 0, got {group['eps']}")

    def buffer_names(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def update(self, group, param, grad, state, scratch) -> None:
        work, _ = scratch
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        m, v, t = state["exp_avg"], state["exp_avg_sq"], self.step_count
        if jit.usable(param, grad, m, v):
            real = param.dtype.type
            shrink, l2 = (1.0 - lr * decay, 0.0) if self.decoupled else (1.0, decay)
            _adam_kernel(jit.flat(param), jit.flat(grad), jit.flat(m), jit.flat(v), real(shrink), real(l2),
                         real(beta1), real(beta2), real(1.0 - beta2), real(eps), real(lr / (1.0 - beta1**t)),
                         real(math.sqrt(1.0 - beta2**t)))
            return
        g = grad
        if decay != 0.0:
            if self.decoupled:
                param *= 1.0 - lr * decay  # AdamW Eq. (1)
            else:
                xp.multiply(param, decay, out=work)  # Eq. (1): lambda theta
                work += grad  # Eq. (1)
                g = work
        m -= g  # Eq. (2) as m + (1 - beta1)(g - m) = beta1 (m - g) + g:
        m *= beta1  # Eq. (2)
        m += g  # Eq. (2)
        v *= beta2  # Eq. (3)
        xp.multiply(g, g, out=work)  # Eq. (3): g^2 (work may alias g)
        work *= 1.0 - beta2  # Eq. (3)
        v += work  # Eq. (3)
        step_size = lr / (1.0 - beta1**t)  # Eq. (6): eta / (1 - beta1^t)
        xp.sqrt(v, out=work)  # Eq. (6): denominator
        work /= math.sqrt(1.0 - beta2**t)  # Eq. (6)
        work += eps  # Eq. (6)
        xp.divide(m, work, out=work)  # Eq. (6)
        work *= step_size  # Eq. (6)
        param -= work  # Eq. (6)


@jit.kernel
def _adam_kernel(param, grad, m, v, shrink, l2, beta1, beta2, one_minus_beta2, eps, step_size, bias2_sqrt):
    r"""Adam's Eqs. (1)-(6) for one parameter, element by element; AdamW passes ``shrink`` = $1 - \eta\lambda$."""
    for i in range(param.size):
        p = param[i]
        g = grad[i]
        if l2 != 0.0:
            g = g + l2 * p  # Adam Eq. (1)
        p = p * shrink  # AdamW Eq. (1) (1 for Adam)
        mi = beta1 * (m[i] - g) + g  # Eq. (2)
        vi = beta2 * v[i] + one_minus_beta2 * (g * g)  # Eq. (3)
        m[i] = mi
        v[i] = vi
        param[i] = p - mi / (numpy.sqrt(vi) / bias2_sqrt + eps) * step_size  # Eq. (6)


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``.

    At step $t$ the parameter first shrinks towards zero by a factor that does
    not depend on the gradient, then takes the plain Adam step (no L2 term):

    $$
    \theta' = (1 - \eta\lambda)\, \theta_{t-1} \tag{1}
    $$

    $$
    g_t = \nabla_\theta L(\theta_{t-1}) \tag{2}
    $$

    followed by Adam's (2)–(6) with $\theta'$ in place of $\theta_{t-1}$:

    $$
    \theta_t = \theta' - \frac{\eta}{1 - \beta_1^t}\,
    \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}. \tag{3}
    $$

    The decay (1) is applied to every parameter of a group with
    $\lambda > 0$; use :func:`param_groups` to exempt biases and LayerNorm.

    Args:
        params: a Module, or a list of groups ``{"params": [(name, param, grad), ...], **overrides}``.
        lr: $\eta$.
        betas: $(\beta_1, \beta_2)$.
        eps: $\epsilon$.
        weight_decay: $\lambda$ of (1) (default 0.01, as PyTorch).

    State: ``"exp_avg.<name>"`` and ``"exp_avg_sq.<name>"``, as :class:`Adam`.
    """

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def clip_grad_norm(grads, max_norm: float) -> float:
    r"""Scale gradients in place so that their global L2 norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: the norm is taken over all
    gradients as one vector,

    $$
    \lVert g \rVert = \Big( \sum_k \sum_i g_{k,i}^2 \Big)^{1/2}, \tag{1}
    $$

    and every gradient is multiplied by the same factor when that factor is
    below one:

    $$
    c = \frac{\mathrm{max\_norm}}{\lVert g \rVert + 10^{-6}}, \qquad
    g_k \leftarrow c\, g_k \quad \text{if } c < 1. \tag{2}
    $$

    The direction of the update is kept; only its length is capped.

    Args:
        grads: an iterable of gradient arrays, or of ``(name, grad)`` pairs
            (e.g. ``model.named_grads()``).
        max_norm: the largest allowed global norm (> 0).

    Returns:
        The total norm **before** clipping, as a Python float. If it is not
        finite (a NaN or infinite gradient), nothing is scaled and the
        non-finite norm is returned: the caller decides whether to skip the
        step or stop training.
    """
    if not max_norm > 0.0:
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm}")
    arrays = [item[1] if isinstance(item, tuple) else item for item in grads]
    total = 0.0
    for grad in arrays:
        flat = grad.reshape(-1)
        total += float(xp.vdot(flat, flat))  # Eq. (1): sum of squares, no temporary
    total_norm = math.sqrt(total)  # Eq. (1)
    if not math.isfinite(total_norm):
        return total_norm
    coefficient = float(max_norm) / (total_norm + 1e-6)  # Eq. (2)
    if coefficient < 1.0:
        for grad in arrays:
            grad *= coefficient  # Eq. (2)
    return total_norm
