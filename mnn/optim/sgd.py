r"""SGD with momentum, Nesterov and (coupled) weight decay, as ``torch.optim.SGD``."""

from __future__ import annotations

from mnn import jit
from mnn.backend import xp
from mnn.optim.optimizer import Optimizer, flush_subnormal


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

    A momentum entry below the smallest normal float is set to zero
    (:func:`~mnn.optim.optimizer.flush_subnormal`, which says why): it moves
    no parameter, and left there it slows every later step.

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
        lr, mu, decay = group["lr"], group["momentum"], group["weight_decay"]
        buf = state["momentum"] if mu != 0.0 else param  # param: an unused stand-in when there is no momentum
        if jit.usable(param, grad, buf):
            real = param.dtype.type
            _sgd_kernel(jit.flat(param), jit.flat(grad), jit.flat(buf), real(lr), real(mu), real(decay),
                        real(1.0 - group["dampening"]), group["nesterov"], self.step_count == 1,
                        real(xp.finfo(param.dtype).tiny))
            return
        work, spare = scratch()  # numpy's path: two work arrays of this thread's own
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
                flush_subnormal(buf)
            if group["nesterov"]:
                xp.multiply(buf, mu, out=spare)  # Eq. (3): mu b_t
                spare += direction  # Eq. (3)
                direction = spare
            else:
                direction = buf  # Eq. (3)
        xp.multiply(direction, lr, out=work)  # Eq. (4): eta d_t (work may alias direction)
        param -= work  # Eq. (4)


@jit.kernel
def _sgd_kernel(param, grad, buf, lr, mu, decay, keep, nesterov, first, tiny):
    r"""SGD's Eqs. (1)-(4) for one parameter, element by element (``keep`` = $1 - \tau$, ``tiny`` the
    smallest normal float)."""
    for i in range(param.size):
        d = grad[i]
        if decay != 0.0:
            d = d + decay * param[i]  # Eq. (1)
        if mu != 0.0:
            if first:
                b = d  # Eq. (2), t = 1
            else:
                b = mu * buf[i] + keep * d  # Eq. (2)
                if abs(b) < tiny:
                    b = b - b  # flush_subnormal: zero, of the dtype b has
            buf[i] = b
            if nesterov:
                d = d + mu * b  # Eq. (3)
            else:
                d = b  # Eq. (3)
        param[i] -= lr * d  # Eq. (4)
