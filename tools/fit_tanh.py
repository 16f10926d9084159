r"""Fit the rational function that GELU's compiled float32 loop uses for ``tanh`` (:mod:`mnn.layers.gelu`).

``tanh`` is odd and tends to 1, so on $[0, 9]$ (beyond 9 it is 1 in float32)
it is written as

$$
\tanh u \approx u\, \frac{P(s)}{Q(s)}, \qquad s = (u / 9)^2,
$$

with $P$ of degree 6 and $Q$ of degree 3, $Q(0) = 1$: eleven numbers, and
only multiplications, additions and one division per element, which a
compiled loop runs on every SIMD lane (numba has no vectorised ``tanh``).

The fit minimises the largest *relative* error. Two classical iterations do
it with linear least squares only:

- Loeb: $P(s) u - t\,Q(s) = 0$ is linear in the coefficients; weighting each
  point by $1 / (t\, Q_{\text{previous}}(s))$ makes the residual the relative
  error of $P/Q$ once $Q$ settles.
- Lawson: multiplying each point's weight by its current error moves the
  least-squares solution towards the minimax one (the largest errors weigh more).

Usage::

    python tools/fit_tanh.py    # prints the coefficients (float32) and their error
"""

from __future__ import annotations

import numpy

LIMIT = 9.0  # tanh(9) = 1 - 3e-8: 1 in float32
NUMERATOR, DENOMINATOR = 7, 4  # coefficients: P of degree 6, Q of degree 3


def fit(iterations: int = 200) -> tuple[numpy.ndarray, numpy.ndarray, float]:
    """``(p, q, largest relative error)`` of the float64 fit on a dense grid of ``[0, LIMIT]``."""
    u = numpy.concatenate([numpy.linspace(0.0, LIMIT, 40001)[1:], numpy.geomspace(1e-5, 0.5, 3000)])
    t, s = numpy.tanh(u), (u / LIMIT) ** 2
    powers = numpy.stack([s ** k for k in range(max(NUMERATOR, DENOMINATOR))], axis=1)
    system = numpy.hstack([powers[:, :NUMERATOR] * u[:, None], -t[:, None] * powers[:, 1:DENOMINATOR]])
    weight, q_values, best = numpy.ones_like(u), numpy.ones_like(u), None
    for _ in range(iterations):
        scale = numpy.sqrt(weight) / (t * q_values)  # Loeb's 1/(t Q) and Lawson's weight
        solution = numpy.linalg.lstsq(system * scale[:, None], t * scale, rcond=None)[0]
        p, q = solution[:NUMERATOR], numpy.concatenate([[1.0], solution[NUMERATOR:]])
        q_values = powers[:, :DENOMINATOR] @ q
        error = numpy.abs(u * (powers[:, :NUMERATOR] @ p) / q_values - t) / t
        if best is None or error.max() < best[2]:
            best = (p, q, float(error.max()))
        weight = weight * error
        weight /= weight.mean()
    return best


def tanh32(u, p, q):
    """The rational ``tanh`` evaluated in float32 as the loop does (clamp, Horner), for checking."""
    u = numpy.clip(numpy.asarray(u, numpy.float32), -LIMIT, LIMIT)
    s = u * u * numpy.float32(1.0 / LIMIT**2)
    numerator, denominator = numpy.full_like(u, p[-1]), numpy.full_like(u, q[-1])
    for c in p[-2::-1]:
        numerator = numerator * s + c
    for c in q[-2::-1]:
        denominator = denominator * s + c
    return u * numerator / denominator


def ulps(approximation, u) -> numpy.ndarray:
    """Errors of float32 ``approximation`` of ``tanh(u)`` in units in the last place of the float32 answer."""
    exact = numpy.tanh(numpy.asarray(u, numpy.float64))
    return numpy.abs(approximation - exact) / numpy.spacing(numpy.abs(exact.astype(numpy.float32))).astype(float)


def main() -> None:
    p, q, error = fit()
    p32, q32 = p.astype(numpy.float32), q.astype(numpy.float32)
    print(f"largest relative error of the float64 fit: {error:.3g}")
    print("P =", tuple(float(c) for c in p32))
    print("Q =", tuple(float(c) for c in q32))
    u = numpy.linspace(-12.0, 12.0, 2_000_001, dtype=numpy.float32)
    print(f"float32 evaluation on [-12, 12]: at most {ulps(tanh32(u, p32, q32), u).max():.2f} ulp "
          f"(numpy's tanh: {ulps(numpy.tanh(u), u).max():.2f})")


if __name__ == "__main__":
    main()
