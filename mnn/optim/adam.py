r"""Adam and AdamW (decoupled weight decay), as ``torch.optim.Adam`` / ``AdamW``."""

from __future__ import annotations

import math

import numpy

from mnn import cuda_kernels, jit
from mnn.backend import xp
from mnn.optim.optimizer import Optimizer, flush_subnormal


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

    Moments below the smallest normal float are set to zero
    (:func:`~mnn.optim.optimizer.flush_subnormal`, which says why).

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
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        m, v, t = state["exp_avg"], state["exp_avg_sq"], self.step_count
        if jit.usable(param, grad, m, v):
            real = param.dtype.type
            shrink, l2 = (1.0 - lr * decay, 0.0) if self.decoupled else (1.0, decay)
            _adam_kernel(jit.flat(param), jit.flat(grad), jit.flat(m), jit.flat(v), real(shrink), real(l2),
                         real(beta1), real(beta2), real(1.0 - beta2), real(eps), real(lr / (1.0 - beta1**t)),
                         real(math.sqrt(1.0 - beta2**t)), real(xp.finfo(param.dtype).tiny))
            return
        if cuda_kernels.usable(param, grad, m, v):  # the GPU: Eqs. (1)-(6) in one pass
            shrink, l2 = (1.0 - lr * decay, 0.0) if self.decoupled else (1.0, decay)
            cuda_kernels.adam_update(param, grad, m, v, shrink, l2, beta1, beta2, eps, lr / (1.0 - beta1**t),
                                     math.sqrt(1.0 - beta2**t))
            return
        work, _ = scratch()  # numpy's path: one work array of this thread's own
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
        flush_subnormal(m)
        flush_subnormal(v)
        step_size = lr / (1.0 - beta1**t)  # Eq. (6): eta / (1 - beta1^t)
        xp.sqrt(v, out=work)  # Eq. (6): denominator
        work /= math.sqrt(1.0 - beta2**t)  # Eq. (6)
        work += eps  # Eq. (6)
        xp.divide(m, work, out=work)  # Eq. (6)
        work *= step_size  # Eq. (6)
        param -= work  # Eq. (6)


@jit.kernel
def _adam_kernel(param, grad, m, v, shrink, l2, beta1, beta2, one_minus_beta2, eps, step_size, bias2_sqrt, tiny):
    r"""Adam's Eqs. (1)-(6) for one parameter, element by element; AdamW passes ``shrink`` = $1 - \eta\lambda$,
    ``tiny`` is the smallest normal float (:func:`~mnn.optim.optimizer.flush_subnormal`)."""
    for i in range(param.size):
        p = param[i]
        g = grad[i]
        if l2 != 0.0:
            g = g + l2 * p  # Adam Eq. (1)
        p = p * shrink  # AdamW Eq. (1) (1 for Adam)
        mi = beta1 * (m[i] - g) + g  # Eq. (2)
        vi = beta2 * v[i] + one_minus_beta2 * (g * g)  # Eq. (3)
        if abs(mi) < tiny:
            mi = mi - mi  # flush_subnormal
        if vi < tiny:
            vi = vi - vi  # flush_subnormal
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
