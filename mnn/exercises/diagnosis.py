r"""Say in words how a gradient differs from the right one: the mistakes a backward is most often written with.

Given the student's gradient and mnn's (both float64, for the same inputs
and the same random upstream gradient), :func:`diagnose` tries, in order:
the wrong shape (transposed, reshaped, summed over an axis), a gradient of
zero, the sign, a transpose of the last two axes, a constant factor (which
it names when it is a size of the inputs: an average taken twice or not at
all, $1/N$; the upstream scalar ignored; a 2 lost from a square), and
signs wrong in some entries only. :func:`explain_exception` reads a numpy
broadcasting error raised inside the student's backward the same way.
"""

from __future__ import annotations

import re

import numpy

EXACT = 1e-6  # how close a pattern (minus, transposed, times c) must match: rounding only


def relative_error(got, expected) -> float:
    """``||got - expected|| / max(||got||, ||expected||)``; 0 when both vanish."""
    got, expected = numpy.asarray(got, dtype=float).ravel(), numpy.asarray(expected, dtype=float).ravel()
    scale = max(numpy.linalg.norm(got), numpy.linalg.norm(expected))
    return 0.0 if scale == 0 else float(numpy.linalg.norm(got - expected) / scale)


def _shape(array) -> str:
    return str(tuple(numpy.shape(array)))


def _wrong_shape(got, expected) -> str:
    got_shape, want = numpy.shape(got), numpy.shape(expected)
    text = f"wrong shape: yours is {_shape(got)}, the tensor is {_shape(expected)}"
    if len(got_shape) >= 2 and got_shape == want[:-2] + want[-1:] + want[-2:-1] and \
            relative_error(numpy.swapaxes(got, -1, -2), expected) < EXACT:
        return text + ("; it is the right gradient transposed (the last two axes swapped): "
                       "a transposed gradient, e.g. G^T X where X^T G was meant, or the product's factors swapped")
    if got_shape == want[::-1] and len(want) >= 2:
        return text + ": the reversed shape, a transposed gradient (a product's factors in the wrong order?)"
    if numpy.size(got) == numpy.size(expected):
        if relative_error(numpy.reshape(got, want), expected) < EXACT:
            return text + "; the values are right, only the shape is lost: reshape it back to the input's shape"
        return text + ", the same number of entries (a reshape or a transpose that lost the input's shape?)"
    for axis, size in enumerate(want):
        if got_shape in (want[:axis] + want[axis + 1:], want[:axis] + (1,) + want[axis + 1:]) and size > 1:
            summed = numpy.sum(expected, axis=axis)
            if relative_error(numpy.reshape(got, summed.shape), summed) < EXACT:
                return text + (f": the right gradient summed over axis {axis}; the gradient of an input keeps every "
                               "axis of the input (only a parameter's gradient sums over the batch)")
            return text + f": axis {axis} (size {size}) is missing"
    return text + ": a gradient has the shape of what it differentiates"


def _factor(c: float, counts: dict) -> str:
    """Words for a gradient that is ``c`` times the right one."""
    sign = "minus " if c < 0 else ""
    size = abs(c)
    for label, count in counts.items():
        if label.startswith("the upstream"):  # a scalar of either sign: compared with its sign
            if abs(c * count - 1) < 1e-6:
                return (f"{c:.4g} times the right one, i.e. divided by {label} ({count:.4g}): your gradient "
                        "does not carry the upstream gradient; multiply by it (the chain rule)")
            if abs(c / count - 1) < 1e-6:
                return f"{count:.4g} times the right one ({label}): the upstream gradient is multiplied in twice"
            continue
        if count in (0, 1):
            continue
        if abs(size * count - 1) < 1e-6:
            return (f"{sign}1/{count:g} times the right one: divided by {label} once too often: an average taken "
                    "twice (1/N where the loss has already taken it, or layers averaging over the batch, which "
                    "only the loss does)")
        if abs(size / count - 1) < 1e-6:
            return f"{sign}{count:g} times the right one: the 1/N of the mean is missing, with N = {label}"
    for value, text in ((2.0, "2 times"), (0.5, "half")):
        if abs(size / value - 1) < 1e-6:
            return f"{sign}{text} the right one: a factor 2 (from the derivative of a square?) lost or added"
    return f"{sign}{size:.4g} times the right one: a missing or extra constant factor"


def diagnose(got, expected, counts: dict) -> str | None:
    """What is wrong with ``got`` against ``expected`` in plain words, or ``None`` when it is right (1e-7).

    Args:
        got: the student's gradient (any array, or None).
        expected: mnn's gradient for the same inputs and upstream gradient.
        counts: ``{label: number}`` of sizes a factor could come from (``"N = 6, the rows of x": 6``).
    """
    if got is None:
        return "missing: backward returned None for it"
    got = numpy.asarray(got)
    if got.shape != numpy.shape(expected):
        return _wrong_shape(got, expected)
    if not numpy.all(numpy.isfinite(got)):
        return "not finite (NaN or infinity): a division by zero, or an exponential that overflowed?"
    error = relative_error(got, expected)
    if error <= 1e-7:
        return None
    got, expected = got.astype(float), numpy.asarray(expected, dtype=float)
    if not numpy.any(got):
        return "zero everywhere: never computed, or added into a copy that was then dropped"
    if relative_error(-got, expected) < EXACT:
        return "a sign error: yours is exactly minus the right gradient"
    if got.ndim >= 2 and got.shape[-1] == got.shape[-2] and relative_error(numpy.swapaxes(got, -1, -2), expected) < EXACT:
        return "transposed: yours is the right gradient with its last two axes swapped (a product's factors swapped?)"
    norm = float(numpy.vdot(expected, expected))
    if norm > 0:
        c = float(numpy.vdot(got, expected)) / norm
        if relative_error(got, c * expected) < EXACT:
            return _factor(c, counts)
    if relative_error(numpy.abs(got), numpy.abs(expected)) < EXACT:
        flipped = int(numpy.sum(numpy.sign(got) != numpy.sign(expected)))
        return (f"the sizes are right but the sign is wrong in {flipped} of {got.size} entries: a sign error in one "
                "term (or one case of a piecewise derivative)")
    index = numpy.unravel_index(int(numpy.argmax(numpy.abs(got - expected))), got.shape)
    wrong = int(numpy.sum(~numpy.isclose(got, expected, rtol=1e-6, atol=1e-9 * numpy.abs(expected).max())))
    return (f"wrong in {wrong} of {got.size} entries, with no simple pattern (not a sign, a transpose or a constant "
            f"factor); the largest difference is at index {tuple(int(i) for i in index)}: yours "
            f"{got[index]:.6g}, expected {expected[index]:.6g}")


def locate(got, expected, blocks: int | None = None) -> tuple[list[int], list[int]] | None:
    """``(right, wrong)`` indices along the first axis (or of ``blocks`` equal row blocks, such as the gate blocks
    of a recurrent weight), where some parts are right and some are not; ``None`` otherwise."""
    got, expected = numpy.asarray(got, dtype=float), numpy.asarray(expected, dtype=float)
    if got.shape != expected.shape or got.ndim == 0:
        return None
    if blocks:
        if got.shape[0] % blocks:
            return None
        got, expected = got.reshape(blocks, -1), expected.reshape(blocks, -1)
    right = [i for i in range(got.shape[0]) if relative_error(got[i], expected[i]) <= 1e-7]
    if not right or len(right) == got.shape[0]:
        return None
    return right, [i for i in range(got.shape[0]) if i not in right]


def explain_exception(error: BaseException) -> str:
    """A numpy shape error, with what its two shapes suggest (a transposed operand); other errors as they are."""
    message = str(error)
    shapes = re.findall(r"\(([\d, ]*)\)", message)
    parsed = [tuple(int(v) for v in s.replace(" ", "").split(",") if v) for s in shapes]
    found = [p for p in parsed if len(p) >= 2]
    for a in found:
        for b in found:
            if a != b and a == b[::-1]:
                return (f"{type(error).__name__}: {message}: the shapes {a} and {b} are each other's reverse: a "
                        "transposed gradient (e.g. X^T G where G^T X was meant)")
    if isinstance(error, ValueError) and ("broadcast" in message or "shape" in message):
        return f"{type(error).__name__}: {message}: a gradient of the wrong shape"
    return f"{type(error).__name__}: {message}"
