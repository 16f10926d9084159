r"""Check a student's backward: finite differences, mnn's own layer, and the contract, with a verdict in words.

For each of a few random cases (:mod:`mnn.exercises.catalog`), in float64:

1. the student's layer and mnn's are built with the same parameters and run
   forward on copies of the same inputs (the forward must agree: it is mnn's);
2. both run backward with the same random upstream gradient; every gradient
   (of each floating input, of each parameter) is compared with mnn's, and a
   wrong one is diagnosed (:func:`mnn.exercises.diagnosis.diagnose`, a sign, a
   transpose, a factor $1/N$, a shape);
3. the contract (:mod:`mnn.module`): the cache released, nothing the caller
   holds (the inputs, the output, the upstream gradient) changed in place,
   every parameter's gradient added in place (pre-filled gradients must keep
   what they held);
4. :func:`mnn.gradcheck` measures the student's gradients against central
   finite differences.

The verdict passes when every relative error is at most ``1e-7`` and the
contract holds; it then prints the errors it measured.
"""

from __future__ import annotations

import importlib.util
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from mnn import backend
from mnn.backend import xp
from mnn.errors import MnnError
from mnn.exercises.catalog import EXERCISES, Exercise, find
from mnn.exercises.diagnosis import diagnose, explain_exception, locate, relative_error
from mnn.exercises.skeleton import NOT_WRITTEN
from mnn.gradcheck import gradcheck
from mnn.module import Module

TOLERANCE = 1e-7


class _Probe(Module):
    """Every kind of layer behind one interface: ``forward(*inputs)`` -> one flat array, ``backward(g)`` -> a
    gradient per input (``None`` for integer inputs), so that :func:`mnn.gradcheck` takes losses and LSTMs too."""

    def __init__(self, layer: Module, kind: str) -> None:
        super().__init__()
        self.layer, self.kind, self.outputs = layer, kind, []

    def children(self):
        yield "", self.layer  # the layer's own parameter names, without a prefix

    def forward(self, *inputs):
        if self.kind == "recurrent":
            x, *state = inputs
            output, final = self.layer.forward(x, tuple(state) if len(state) > 1 else state[0])
            self.outputs = [output, *(final if isinstance(final, tuple) else (final,))]
        else:
            self.outputs = [self.layer.forward(*inputs)]
        self.cache = (len(inputs), [numpy.shape(o) for o in self.outputs])
        return xp.concatenate([xp.asarray(o, dtype=xp.float64).reshape(-1) for o in self.outputs])

    def backward(self, g):
        count, shapes = self.pop_cache()
        parts, start = [], 0
        for shape in shapes:
            size = int(numpy.prod(shape))
            parts.append(g[start:start + size].reshape(shape))
            start += size
        if self.kind == "loss":
            return (self.layer.backward(float(parts[0])),) + (None,) * (count - 1)
        if self.kind == "recurrent":
            dx, dstate = self.layer.backward(parts[0], tuple(parts[1:]) if len(parts) > 2 else parts[1])
            return (dx, *(dstate if isinstance(dstate, tuple) else (dstate,)))
        result = self.layer.backward(parts[0])
        return result if isinstance(result, tuple) else (result,)


@dataclass
class Report:
    """What :func:`check` found: ``lines`` to print, ``passed``, and ``problems`` (one sentence each)."""
    exercise: Exercise
    lines: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    not_written: bool = False
    worst: dict = field(default_factory=lambda: {"mnn": 0.0, "finite differences": 0.0})

    @property
    def passed(self) -> bool:
        return not self.problems and not self.not_written

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def load_student(path) -> tuple[Exercise, type]:
    """The exercise a file is for (its ``# mnn exercise: NAME`` line, else a class named as an exercise) and its class.

    Raises:
        MnnError: the file is missing, does not run, or holds no exercise's class.
    """
    path = Path(path)
    if not path.is_file():
        raise MnnError(f"{path}: no such file (mnn exercise start NAME writes one)")
    text = path.read_text(encoding="utf-8")
    marker = re.search(r"^# mnn exercise: (\w+)", text, re.M)
    spec = importlib.util.spec_from_file_location(f"mnn_exercise_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the student's file: any error is theirs to see, with its line
        raise MnnError(f"{path} does not run: {_where(error, path)}{type(error).__name__}: {error}") from None
    names = [marker.group(1)] if marker else [e.name for e in EXERCISES]
    for name in names:
        candidate = getattr(module, name, None)
        if isinstance(candidate, type) and issubclass(candidate, Module):
            return find(name), candidate
    raise MnnError(f"{path}: no exercise class in it (expected one of {', '.join(names)})")


def _where(error: BaseException, path: Path) -> str:
    """``line 57 (self.grads["bias"] = ...): `` for the last frame of ``error`` in the student's file."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    if isinstance(error, SyntaxError) and error.lineno:
        return f"line {error.lineno}: "
    return f"line {frames[-1].lineno} ({frames[-1].line.strip()}): " if frames else ""


def _build(cls, exercise: Exercise, case, reference: Module | None = None) -> Module:
    layer = cls(*case.layer_args, **case.layer_kwargs)
    if reference is not None:
        layer.load_state_dict(reference.state_dict())
    elif case.prepare is not None:
        case.prepare(layer, numpy.random.default_rng(7))
    return layer


def _counts(case, exercise: Exercise, upstream) -> dict:
    """The sizes a constant factor could come from, named: rows, elements, each axis; a loss's upstream scalar."""
    counts = {}
    if exercise.kind == "loss":
        counts["the upstream gradient dloss"] = float(upstream[0])
    for name, array in zip(case.input_names, case.inputs):
        shape = numpy.shape(array)
        if len(shape) > 1:
            counts.setdefault(f"the {int(numpy.prod(shape[:-1]))} rows of {name} (every axis but the last)",
                              int(numpy.prod(shape[:-1])))
        counts.setdefault(f"the {int(numpy.prod(shape))} elements of {name}", int(numpy.prod(shape)))
        for axis, size in enumerate(shape):
            counts.setdefault(f"{name}.shape[{axis}] = {size}", size)
    return counts


def _arrays(value) -> list:
    """Every array inside a cache (tuples, lists, dicts, nested)."""
    if isinstance(value, numpy.ndarray):
        return [value]
    if isinstance(value, (tuple, list)):
        return [a for item in value for a in _arrays(item)]
    if isinstance(value, dict):
        return [a for item in value.values() for a in _arrays(item)]
    return []


def _in_place_problems(held: dict, cached: list) -> list[str]:
    problems = []
    for label, (array, saved) in held.items():
        if array.shape == saved.shape and numpy.array_equal(array, saved, equal_nan=True):
            continue
        was_cached = any(numpy.shares_memory(array, c) for c in cached)
        whose = ("the layer above owns it, and a residual branch may hand the same array to two layers"
                 if "upstream" in label else "it is a cached array others hold too (the caller, the next layer)")
        problems.append(f"backward changed {label} in place{' (forward cached it)' if was_cached else ''}: "
                        f"{whose}; compute into a new array instead of writing into it")
    return problems


def _accumulation_problems(probe, student, case, upstream, first: dict) -> list[str]:
    """Pre-fill each gradient with P, run forward and backward again: it must end as P + the first gradient."""
    prefill = {}
    for name, grad in student.named_grads():
        scale = max(1.0, float(numpy.abs(first[name]).max())) if grad.size else 1.0
        prefill[name] = numpy.random.default_rng(3).standard_normal(grad.shape) * scale
        grad[...] = prefill[name]
    before = dict(student.named_grads())
    probe.forward(*[numpy.copy(x) for x in case.inputs])
    probe.backward(upstream.copy())
    problems = []
    for name, grad in student.named_grads():
        if grad is not before[name]:
            continue  # reported as a new array already
        if relative_error(grad, prefill[name] + first[name]) <= TOLERANCE:
            continue
        if relative_error(grad, first[name]) <= TOLERANCE:
            problems.append(f"grads['{name}'] is overwritten, not accumulated: backward assigned this step's "
                            f"gradient over what the gradient held (self.grads['{name}'] = ..., or [...] = ...); "
                            f"add it in place: self.grads['{name}'] += ... (gradients accumulate over micro-batches "
                            "and tied weights; zero_grad clears them once per step)")
        else:
            problems.append(f"grads['{name}'] does not accumulate: with the gradient pre-filled, backward left "
                            f"neither (what it held + this step's gradient) nor this step's gradient alone "
                            f"(relative error {relative_error(grad, prefill[name] + first[name]):.1e})")
    return problems


def _parts(exercise: Exercise, label: str, have, want) -> str:
    """Where a wrong gradient is right and where not, in the exercise's words (time steps, gates), or ''."""
    spec = exercise.extra.get("locate", {})
    template, names = spec.get("grads" if label.startswith("grads[") else label,
                               (f"right in {label}[{{right}}]; wrong in {label}[{{wrong}}] (along axis 0)", None))
    found = locate(have, want, blocks=len(names) if names else None)
    if found is None:
        return ""
    right, wrong = [", ".join(names[i] if names else str(i) for i in part[:8]) for part in found]
    text = "; " + template.format(right=right, wrong=wrong)
    if "time step" in template and found[0] == [len(found[0]) + len(found[1]) - 1]:
        text += (" (only the last step is right: look at what is carried back from each step to the one before, "
                 "the gradients reaching h and c)")
    return text


def _run_case(report: Report, student_cls, case, path: Path, rng) -> None:
    exercise = report.exercise
    reference = _build(exercise.reference(), exercise, case)
    try:
        student = _build(student_cls, exercise, case, reference)
    except Exception as error:  # the student's class: show what it raised, with the line
        report.problems.append(f"building your {exercise.name} failed: {_where(error, path)}{explain_exception(error)}")
        return
    ref_probe, probe = _Probe(reference, exercise.kind), _Probe(student, exercise.kind)
    y_ref = ref_probe.forward(*[numpy.copy(x) for x in case.inputs])
    inputs = [numpy.copy(x) for x in case.inputs]
    try:
        y = probe.forward(*inputs)
    except Exception as error:
        report.problems.append(f"your forward raised {_where(error, path)}{explain_exception(error)}")
        return
    if y.shape != y_ref.shape or relative_error(y, y_ref) > 1e-12:
        report.problems.append("your forward does not give mnn's output: the exercise is the backward, keep the "
                               "forward as it was written")
        return
    upstream = rng.standard_normal(y_ref.shape)
    if exercise.kind == "loss":
        upstream = rng.uniform(0.5, 2.0, y_ref.shape) * rng.choice([-1.0, 1.0])  # not 1: a dloss left out shows
    expected = ref_probe.backward(upstream.copy())
    expected_params = {name: grad.copy() for name, grad in reference.named_grads()}
    given = upstream.copy()
    held = {f"the input {n}": (x, x.copy()) for n, x in zip(case.input_names, inputs)}
    held.update({f"the output{'' if len(probe.outputs) == 1 else f' {i}'} (which forward returned)": (o, o.copy())
                 for i, o in enumerate(probe.outputs)})
    cached = [a for _, module in student.named_modules() for a in _arrays(module.cache)]
    grads_before = dict(student.named_grads())
    try:
        got = probe.backward(given)
    except NotImplementedError as error:
        report.not_written = True
        report.lines.append(f"  {error or NOT_WRITTEN}")
        return
    except Exception as error:
        report.problems.append(f"your backward raised, at {_where(error, path)}{explain_exception(error)}")
        return
    held["the upstream gradient dy"] = (given, upstream)
    changed = _in_place_problems(held, cached)
    report.problems += changed
    kept = [name or "the layer" for name, module in student.named_modules() if module is not probe
            and module.cache is not None]
    if kept:
        report.problems.append(f"cache not released ({', '.join(kept)}): read it with self.pop_cache(), which "
                               "releases it (self.cache = None), so activations do not outlive the step and a second "
                               "backward without a forward fails loudly")
    counts = _counts(case, exercise, upstream)
    rows = []
    grads_after = dict(student.named_grads())
    for name, want, have in zip(case.input_names, expected, got + (None,) * (len(expected) - len(got))):
        if want is not None:
            rows.append((f"d{name}", have, want))
    for name, want in expected_params.items():
        have = grads_after.get(name)
        if have is not grads_before.get(name):
            report.problems.append(f"grads['{name}'] was replaced by a new array: the optimizer holds the old one, "
                                   f"which never sees this gradient; add in place: self.grads['{name}'] += ...")
        rows.append((f"grads['{name}']", have, want))
    first = {name: numpy.array(grad) for name, grad in grads_after.items()}
    shape_problem = False
    for index, (label, have, want) in enumerate(rows):
        words = diagnose(have, want, counts)
        error = relative_error(have, want) if have is not None and numpy.shape(have) == numpy.shape(want) else None
        if words is not None and error is not None:
            words += _parts(exercise, label, have, want)
        rows[index] = (label, error, words)
        if words is not None:
            report.problems.append(f"{label} is wrong: {words}")
            shape_problem |= error is None
    if grads_before and not report.problems:
        report.problems += _accumulation_problems(probe, student, case, upstream, first)
    numeric = {}
    if changed:
        report.lines.append("  (finite differences skipped: backward changes the arrays they perturb)")
    elif not shape_problem:
        try:
            numeric = gradcheck(probe, [numpy.copy(x) for x in case.inputs], upstream=upstream.copy(),
                                raise_on_failure=False)
        except Exception as error:
            report.problems.append(f"the finite-difference check failed: {explain_exception(error)}")
    numeric_by_label = {(f"d{case.input_names[int(k[5:])]}" if k.startswith("input") else f"grads['{k}']"): v
                        for k, v in numeric.items() if not k.endswith("(accumulation)")}
    for label, error, words in rows:
        fd = numeric_by_label.get(label)
        measured = f"mnn {error:.1e}" if error is not None else "mnn -"
        measured += f", finite differences {fd:.1e}" if fd is not None else ""
        report.lines.append(f"  {label:<22} {measured:<44} {'right' if words is None else 'WRONG'}")
        if error is not None:
            report.worst["mnn"] = max(report.worst["mnn"], error)
        if fd is not None:
            report.worst["finite differences"] = max(report.worst["finite differences"], fd)
            if fd > TOLERANCE and words is None:
                report.problems.append(f"{label} differs from finite differences by {fd:.1e}")


def check(path, trials: int = 2, seed: int = 0) -> Report:
    """Check the exercise in ``path``: ``trials`` random cases; the :class:`Report` says what is right and wrong.

    Raises:
        MnnError: the file is missing, does not run, or holds no exercise.
    """
    path = Path(path)
    exercise, student_cls = load_student(path)
    method = "/".join(exercise.write)
    report = Report(exercise)
    report.lines.append(f"Checking {exercise.name}.{method} in {path.name} against mnn's {exercise.name} and finite "
                        "differences (float64, random shapes and upstream gradients); relative errors:")
    previous, device = backend.default_dtype(), backend.device
    backend.use("cpu")  # host work: float64 finite differences, compared with numpy
    backend.set_default_dtype(numpy.float64)
    try:
        for trial in range(trials):
            rng = numpy.random.default_rng([seed, trial])
            case = exercise.make_case(rng, trial)
            report.lines.append(f"case {trial + 1}: {case.text}")
            _run_case(report, student_cls, case, path, rng)
            if report.problems or report.not_written:
                break
    finally:
        backend.set_default_dtype(previous)
        if device != "cpu":
            backend.use(device)
    name = f"{exercise.name}.{method}"
    if report.not_written:
        report.lines.append(f"NOT WRITTEN YET: {name} still raises NotImplementedError. Write it, then check "
                            f"again; --hint gives the first step of the derivation.")
    elif report.problems:
        report.lines.append(f"FAIL: {name} is not right yet:")
        report.lines += [f"  - {problem}" for problem in dict.fromkeys(report.problems)]
    else:
        report.lines.append(f"PASS: {name} is right. Largest relative error {report.worst['finite differences']:.1e} "
                            f"against finite differences, {report.worst['mnn']:.1e} against mnn's "
                            f"{exercise.name} (tolerance {TOLERANCE:.0e}); gradients accumulate, the cache is "
                            "released, nothing the caller holds is changed.")
    return report
