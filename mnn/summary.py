r"""What a model costs, from its layers' own equations: parameters, FLOPs per pass and the memory backward needs.

:func:`summary` runs one forward pass of a copy of the model on a batch of
zeros of the given shape, in training mode, and for every layer it records

* the **parameters** it owns (a tied array is counted once, where it first
  appears);
* the **matrix-product FLOPs** of its forward and of its backward pass, from
  the layer's :meth:`~mnn.module.Module.flops`, which counts the products its
  docstring derives (a product of an $m \times k$ and a $k \times n$ matrix is
  $2mkn$ FLOPs: $mkn$ multiplications and as many additions). Element-wise
  work (activations, normalisation, softmax, the bias sums $\mathbf{1}^\top G$)
  and gathers (:class:`~mnn.layers.Embedding`) are not matrix products and
  count 0, as in ``torch.utils.flop_counter.FlopCounterMode``, which counts
  the same products (``tests/test_summary.py`` checks that they agree);
* the **bytes its cache keeps for backward**: the arrays ``forward`` stored in
  ``cache``, measured, each underlying buffer once (a view keeps its whole
  base array alive; two layers caching the same array are charged once, the
  first).

A training step holds the weights, their gradients, the optimizer's state
(AdamW: two moments per parameter) and the caches
(:attr:`Summary.training_bytes`), and at its peak, while backward runs, the
gradients and temporaries of one layer on top of the caches not yet
released (:attr:`Summary.peak_bytes`). ``tests/test_summary.py`` compares
the peak with what ``tracemalloc`` measures over a real training step
(numpy reports its arrays to it).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field

from mnn import jit, threads
from mnn.backend import default_dtype, xp


@dataclass
class LayerRow:
    """One layer's line of the summary."""

    name: str  # dotted, as in the state dict
    kind: str  # the class name
    output_shape: tuple
    parameters: int
    parameter_bytes: int
    forward_flops: int
    backward_flops: int
    cached_bytes: int
    output_bytes: int = 0  # the output, and so the gradient backward receives
    input_gradient_bytes: int = 0  # the gradient backward returns (0 for ids or ``input_grad=False``)
    temporary_bytes: int = 0  # what backward holds for the parameters' gradients before adding them in
    note: str = ""


@dataclass
class Summary:
    """The accounting of a model at one batch shape: per-layer rows and totals (see :func:`summary`)."""

    model: str
    batch_shape: tuple
    dtype: str
    rows: list = field(default_factory=list)
    parameters: int = 0
    parameter_bytes: int = 0
    largest_parameter_bytes: int = 0
    input_bytes: int = 0  # the batch, when no layer caches it

    @property
    def optimizer_bytes(self) -> int:
        """mnn's AdamW: two moments per parameter; on numpy's path (no compiled loops) also two work buffers
        the size of the largest parameter, or of :data:`mnn.threads.NUMPY_PIECE` numbers where that is smaller."""
        if jit.enabled():
            return 2 * self.parameter_bytes
        itemsize = self.parameter_bytes // max(self.parameters, 1)
        return 2 * self.parameter_bytes + 2 * min(self.largest_parameter_bytes, threads.NUMPY_PIECE * itemsize)

    @property
    def forward_flops(self) -> int:
        return sum(row.forward_flops for row in self.rows)

    @property
    def backward_flops(self) -> int:
        return sum(row.backward_flops for row in self.rows)

    @property
    def step_flops(self) -> int:
        """Matrix-product FLOPs of one training step: forward and backward (the optimizer's update is element-wise)."""
        return self.forward_flops + self.backward_flops

    @property
    def cached_bytes(self) -> int:
        return sum(row.cached_bytes for row in self.rows)

    @property
    def training_bytes(self) -> int:
        """Weights, gradients, AdamW's state, the batch and the caches: what a step holds at the end of forward."""
        return 2 * self.parameter_bytes + self.optimizer_bytes + self.input_bytes + self.cached_bytes

    @property
    def peak_bytes(self) -> int:
        """:attr:`training_bytes` plus the most that backward holds at once beyond the caches.

        Backward releases the caches from the last layer to the first; while
        layer $i$ runs, the caches of layers $1..i$ are alive, with the
        gradient it receives (its output's size), the gradient it returns (its
        input's) and a temporary the size of its parameters (``dW`` before it
        is added into the gradient; none for a weight whose product adds
        itself in: :meth:`~mnn.module.Module.gradient_temporary_bytes`). The
        peak is the largest such sum.
        """
        alive, working = 0, []
        for row in self.rows:
            alive += row.cached_bytes
            working.append(alive + row.output_bytes + row.input_gradient_bytes + row.temporary_bytes)
        static = 2 * self.parameter_bytes + self.optimizer_bytes + self.input_bytes
        return static + max([self.cached_bytes, *working])

    def as_dict(self) -> dict:
        """The JSON form: the totals at the top (``parameters``, ``forward_flops``, ``backward_flops``,
        ``cached_bytes``, the memory terms), then ``layers``, one object per row."""
        return {"model": self.model, "batch_shape": list(self.batch_shape), "dtype": self.dtype,
                "parameters": self.parameters, "forward_flops": self.forward_flops,
                "backward_flops": self.backward_flops, "cached_bytes": self.cached_bytes,
                "parameter_bytes": self.parameter_bytes, "gradient_bytes": self.parameter_bytes,
                "optimizer_bytes": self.optimizer_bytes, "input_bytes": self.input_bytes,
                "training_bytes": self.training_bytes, "peak_bytes": self.peak_bytes,
                "layers": [{**asdict(row), "output_shape": list(row.output_shape)} for row in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)

    def table(self) -> str:
        """A readable table (like torchinfo's): one line per layer, then the totals."""
        header = ("Layer (type)", "Output shape", "Param #", "Forward FLOPs", "Backward FLOPs", "Cache")
        lines = [(f"{row.name or '(model)'} ({row.kind})", str(tuple(row.output_shape)) if row.output_shape else "-",
                  f"{row.parameters:,}", f"{row.forward_flops:,}", f"{row.backward_flops:,}",
                  readable_bytes(row.cached_bytes) + (f"  {row.note}" if row.note else "")) for row in self.rows]
        widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

        def render(line) -> str:
            return "  ".join(cell.ljust(w) if i in (0, 1, 5) else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))).rstrip()

        rule = "=" * len(render(header))
        out = [f"{self.model}, batch {tuple(self.batch_shape)}, {self.dtype}", rule, render(header),
               "-" * len(rule), *map(render, lines), rule]
        out += [f"Parameters: {self.parameters:,} ({readable_bytes(self.parameter_bytes)})",
                f"Forward: {self.forward_flops:,} FLOPs ({self.forward_flops / 1e9:.3f} GFLOP), matrix products",
                f"Backward: {self.backward_flops:,} FLOPs ({self.backward_flops / 1e9:.3f} GFLOP), matrix products",
                f"Cached for backward: {readable_bytes(self.cached_bytes)}",
                (f"Weights + gradients + AdamW's state + batch + caches: {readable_bytes(self.training_bytes)}; "
                 f"a training step's peak, estimated: {readable_bytes(self.peak_bytes)}"), rule]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def readable_bytes(count: int) -> str:
    """``1536 -> '1.5 KiB'``."""
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def _base_arrays(value, found: list) -> list:
    """Every array in ``value`` (nested tuples, lists, dicts), each replaced by the buffer it views."""
    if isinstance(value, (tuple, list)):
        for item in value:
            _base_arrays(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _base_arrays(item, found)
    elif hasattr(value, "nbytes") and hasattr(value, "shape"):
        while getattr(value, "base", None) is not None and hasattr(value.base, "nbytes"):
            value = value.base
        found.append(value)
    return found


def _example_input(model, batch_shape, dtype=None):
    """Zeros of ``batch_shape``: token ids for a language model (one that has ``check_ids``), else floats."""
    if hasattr(model, "check_ids"):
        return xp.zeros(batch_shape, dtype=xp.int64)
    params = [p for _, p in model.named_parameters()]
    return xp.zeros(batch_shape, dtype=dtype or (params[0].dtype if params else default_dtype()))


def summary(model, batch_shape, dtype=None) -> Summary:
    """Count ``model``'s parameters, matrix-product FLOPs per pass and cached bytes at ``batch_shape``.

    Args:
        model: any :class:`~mnn.module.Module`; it is not touched (a copy runs, so no cache, dropout
            generator or gradient of the model changes).
        batch_shape: the input's shape: ``(B, T)`` token ids for a GPT or char-rnn, ``(N, 784)`` for the
            MLP, ``(N, C, H, W)`` for the CNN.
        dtype: the input's dtype for a float input (default: the parameters').

    Returns:
        a :class:`Summary`: rows in the order the layers ran, totals, ``table()`` and ``as_dict()``.
    """
    batch_shape = tuple(int(n) for n in batch_shape)
    twin = copy.deepcopy(model)
    twin.train()
    calls: dict = {}  # id(module) -> (name, module, input shapes, output shape), in the order they ran
    names = {id(module): name for name, module in twin.named_modules()}

    def recorder(module, forward):
        def recorded(*inputs, **options):
            out = forward(*inputs, **options)
            first = out[0] if isinstance(out, tuple) else out
            arrays = [x for x in inputs if hasattr(x, "shape")]
            floats = sum(int(x.nbytes) for x in arrays if xp.issubdtype(x.dtype, xp.floating))
            returned = floats if getattr(module, "input_grad", True) else 0
            calls.setdefault(id(module), (names[id(module)], module, tuple(tuple(x.shape) for x in arrays),
                                          tuple(getattr(first, "shape", ())), int(getattr(first, "nbytes", 0)),
                                          returned))
            return out
        return recorded

    for _, module in twin.named_modules():
        module.forward = recorder(module, module.forward)
    x = _example_input(twin, batch_shape, dtype)
    twin.forward(x)
    result = Summary(model=type(model).__name__, batch_shape=batch_shape, dtype=str(x.dtype))
    seen_params, seen_buffers = set(), set()
    for name, module in twin.named_modules():  # the order the layers start in (a container records on return)
        ran = id(module) in calls
        _, _, shapes, output_shape, output_bytes, returned_bytes = calls.get(id(module), (0, 0, (), (), 0, 0))
        params, param_bytes, tied = 0, 0, []
        for key, value in module.params.items():
            if id(value) in seen_params:
                tied.append(key)
                continue
            seen_params.add(id(value))
            params += int(value.size)
            param_bytes += int(value.nbytes)
            result.largest_parameter_bytes = max(result.largest_parameter_bytes, int(value.nbytes))
        cached = 0
        for array in _base_arrays(module.cache, []):
            if id(array) not in seen_buffers:
                seen_buffers.add(id(array))
                cached += int(array.nbytes)
        forward_flops, backward_flops = module.flops(*shapes) if ran else (0, 0)
        leaf = not any(True for _ in module.children())
        if not (ran and leaf or params or cached or forward_flops):
            continue  # a container (its layers have their own rows), or a layer without parameters that did not run
        notes = [f"{', '.join(tied)} tied"] if tied else []
        notes += [] if ran else ["not run by forward(): no shapes, no FLOPs"]
        result.rows.append(LayerRow(name, type(module).__name__, output_shape, params, param_bytes,
                                    int(forward_flops), int(backward_flops), cached, output_bytes, returned_bytes,
                                    module.gradient_temporary_bytes() if params else 0, note="; ".join(notes)))
        result.parameters += params
        result.parameter_bytes += param_bytes
    if id(_base_arrays(x, [])[0]) not in seen_buffers:
        result.input_bytes = int(x.nbytes)
    twin.release_caches()
    return result
