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
ufuncs (``out=``, ``*=``) and two work buffers per thread, made at the first
step and reused by every parameter of a dtype, so a step allocates no
parameter-sized temporaries. With numba installed (:mod:`mnn.jit`), SGD and
Adam(W) run the same equations as one compiled loop per parameter instead
(no work buffers): one pass over memory where numpy takes four (SGD with
momentum) or fifteen (Adam).

Parameters that lie end to end in memory
(:meth:`~mnn.module.Module.flatten_parameters`) are updated as runs of up to
:data:`mnn.threads.PIECE` numbers (:data:`mnn.threads.NUMPY_PIECE` on numpy's
path), one call each (:func:`mnn.threads.runs`),
with the same bits; their moments are laid out the same way, one block per
group.
"""

from __future__ import annotations

import math
import threading

import numpy

from mnn import jit, threads
from mnn.backend import on_cpu, to_numpy, xp
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
        self._rows = []  # (group, param, grad, state) runs that one update call takes (mnn.threads.runs)
        for group in self.groups:
            buffers = self.buffer_names(group)
            for buffer in buffers:  # one block per group and buffer: moments lie end to end where parameters do
                for dtype in dict.fromkeys(param.dtype for _, param, _ in group["params"]):  # in the group's order
                    triples = [triple for triple in group["params"] if triple[1].dtype == dtype]
                    block, offset = xp.zeros(sum(int(param.size) for _, param, _ in triples), dtype=dtype), 0
                    for name, param, _ in triples:
                        view = block[offset: offset + param.size].reshape(param.shape)
                        self.state.setdefault(name, {})[buffer] = view
                        offset += int(param.size)
            for name, _, _ in group["params"]:
                self.state.setdefault(name, {})
            columns = [[param for _, param, _ in group["params"]], [grad for _, _, grad in group["params"]]]
            columns += [[self.state[name][buffer] for name, _, _ in group["params"]] for buffer in buffers]
            piece = threads.PIECE if jit.enabled() else threads.NUMPY_PIECE  # numpy's path: pieces stay in cache
            for row in threads.runs(columns, piece):
                self._rows.append((group, row[0], row[1], dict(zip(buffers, row[2:]))))
        self._scratch = threading.local()  # per thread: the updates of two threads must not share a work buffer

    def _scratch_for(self, param) -> tuple:
        """Two work arrays shaped like ``param``, this thread's own (numpy's path of an update uses them)."""
        held = getattr(self._scratch, "buffers", {})
        first, second = held.get(param.dtype, (None, None))
        if first is None or first.size < param.size:
            first, second = xp.empty(param.size, dtype=param.dtype), xp.empty(param.size, dtype=param.dtype)
            held[param.dtype] = (first, second)
            self._scratch.buffers = held
        return first[: param.size].reshape(param.shape), second[: param.size].reshape(param.shape)

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

    def update(self, group: dict, param, grad, state: dict, scratch) -> None:
        """Change ``param`` in place from ``grad`` and its ``state`` (step $t$ = ``self.step_count``).

        ``param`` may be a run of several parameters that lie end to end
        (:func:`mnn.threads.runs`), as a 1-D view: the update is element-wise.
        ``scratch()`` returns two work arrays shaped like ``param``, this
        thread's own; only numpy's path asks for them (the compiled loops need none).
        """
        raise NotImplementedError

    # -- the public methods -----------------------------------------------
    def step(self, zero_grad: bool = False) -> None:
        """Apply one update to every parameter, from the gradients accumulated so far.

        With ``zero_grad=True`` every gradient is zero afterwards, as after
        ``step()`` and :meth:`zero_grad`: each run of gradients is zeroed by
        the thread that updated from it, right after, while it is still in
        cache, instead of in a pass of its own before the next backward. The
        training loop steps so. Measured on 2 cores of an Intel Xeon
        (2026-12-01, alternating blocks in one process): the larger GPT's step
        (10.7 M parameters) 500.4 -> 498.9 ms, the MLP's at batch 64 0.622 ->
        0.608 ms; the GPT CPU recipe's 22.69 -> 22.84 ms, within its noise.
        """
        for name, param, _ in _all_triples(self.groups):
            if not getattr(getattr(param, "flags", None), "writeable", True):
                raise ValueError(f"{type(self).__name__}: parameter {name!r} is read-only (its model's parameters "
                                 "were moved by flatten_parameters after this optimizer was built: build it after)")
        self.step_count += 1

        def run(row) -> None:  # each run's update is its own
            group, param, grad, state = row
            self.update(group, param, grad, state, lambda: self._scratch_for(param))
            if zero_grad:
                grad.fill(0)

        threads.for_each(run, self._rows, [row[1].size for row in self._rows])

    def zero_grad(self) -> None:
        """Set every gradient array this optimizer updates from to zero, in place."""
        grads = [row[0] for row in threads.runs([[grad for _, _, grad in _all_triples(self.groups)]])]
        threads.for_each(lambda grad: grad.fill(0), grads, [grad.size for grad in grads])

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


def flush_subnormal(state) -> None:
    r"""Set the entries of an optimizer's state whose magnitude is below the smallest normal float to zero.

    Why. A moment whose gradient stays zero (a dead ReLU unit, an input pixel
    that is always 0) decays geometrically, $b_t = \mu^t b_0$, and after some
    hundreds of steps reaches the subnormal range ($|b| < 2^{-126} \approx
    1.2 \times 10^{-38}$ in float32). There it does nothing: the step it adds,
    $\eta\, b$ with $\eta \le 1$, is below half a unit in the last place of any
    parameter larger than $2^{-102} \approx 2 \times 10^{-31}$, so the
    parameter rounds back to itself, exactly as if the entry were zero. But an
    x86 core takes a microcode assist of about a hundred cycles for every
    arithmetic instruction that reads or makes a subnormal: on the MLP
    benchmark (784-256-10, SGD momentum 0.9) 12.5% of the first layer's
    momentum was subnormal after 3000 steps, and its update took 256 us
    instead of 130 at batch 64, 1344 us instead of 195 at batch 512 (2 cores
    of an Intel Xeon, 2026-12-01; the update is numba's loop, no BLAS).

    PyTorch keeps the subnormals; a parameter's value differs from its only
    where the parameter itself is within $2^{-102}$ of zero. (The CPU paths
    flush; the CUDA Adam kernel, on hardware that handles subnormals at full
    speed, keeps them as PyTorch does.)
    """
    state[xp.abs(state) < xp.finfo(state.dtype).tiny] = 0


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




def grad_norm(grads) -> float:
    """The global L2 norm of gradients taken as one vector (Eq. 1 of :func:`clip_grad_norm`), read only.

    Args:
        grads: an iterable of gradient arrays, or of ``(name, grad)`` pairs.

    Returns:
        The norm as a Python float (NaN or inf when a gradient is).
    """
    arrays = [item[1] if isinstance(item, tuple) else item for item in grads]
    if on_cpu():  # the same float64 additions in Python floats: half the time of numpy scalars (52 arrays, 0.13 ms)
        total = 0.0
        for array in arrays:
            total += float(xp.vdot(array, array))  # sum of squares (vdot reads the array flat), no temporary
        return math.sqrt(total)
    total = 0.0
    for array in arrays:  # summed on the device in float64: one read-back, not one per array
        flat = array.reshape(-1)
        total = total + xp.vdot(flat, flat).astype(xp.float64)  # sum of squares, no temporary
    return math.sqrt(float(total))


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
    total_norm = grad_norm(arrays)  # Eq. (1)
    if not math.isfinite(total_norm):
        return total_norm
    coefficient = float(max_norm) / (total_norm + 1e-6)  # Eq. (2)
    if coefficient < 1.0:
        runs = [row[0] for row in threads.runs([arrays])]  # arrays that lie end to end: one call
        threads.for_each(lambda grad: xp.multiply(grad, coefficient, out=grad), runs,
                         [grad.size for grad in runs])  # Eq. (2)
    return total_norm
