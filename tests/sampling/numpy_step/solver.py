"""The root of g(α) = E_{q_α}[d] on [0, 1] (docs/ALGORITHM.md §5.5), and q_α itself.

q_α ∝ p_b^(1−α) p_t^α with d = log p_t − log p_b; g(α) = KL(q_α‖p_b) − KL(q_α‖p_t) and
g′(α) = Var_{q_α}[d] ≥ 0, so the root is unique and bracketed by [0, 1].

Written for arrays of a few dozen ids, where numpy's per-call overhead dominates: the input
is one 5×n array of rows log p_b, d, 1, d², d³, so one evaluation is three calls: x = log p_b
+ α·d as a 2-row product, w = exp(x), and one matrix-vector product for Σwd, Σw, Σwd², Σwd³.
The third moment gives g″ for free, so the step is Halley's (cubic convergence: usually two or
three evaluations from a warm start) whenever its correction is small, else Newton's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Solve to well inside the required |g| ≤ 1e-9 so an independent recomputation of the two
# KLs (different rounding) still lands below 1e-9.
G_TOLERANCE = 1e-10
# Bisection from [0, 1] exhausts float64 resolution in about 60 halvings for roots away from 0;
# the cap only matters for pathological inputs, where the best point seen is returned.
MAX_EVALUATIONS = 200
# z below this: the weights underflowed badly (only with extreme, near-disjoint inputs),
# so q_α is recomputed with the largest exponent subtracted.
_UNDERFLOW = 1e-150


class Point(NamedTuple):
    """q_α on the current support, in a form that makes every §6 output free.

    log q_i = x_i − shift − log z; q_i = w_i / z; Σ p_b^(1−α) p_t^α = z·e^shift.
    """

    alpha: float
    g: float  # E_q[d] = KL(q‖p_b) − KL(q‖p_t)
    var: float  # Var_q[d] = g′(α)
    skew: float  # E_q[(d − g)³] = g″(α)
    x: FloatArray  # (1−α) log p_b + α log p_t
    shift: float
    w: FloatArray  # exp(x − shift)
    z: float  # Σ w

    @property
    def chernoff(self) -> float:
        """−log Σ p_b^(1−α) p_t^α (the Chernoff information C when α = α*)."""
        return -(self.shift + math.log(self.z))


def stacked(lb: FloatArray, d: FloatArray) -> FloatArray:
    """The solver's input, a 5×n array with rows log p_b, d, 1, d², d³ (see `evaluate`)."""
    stack = np.empty((5, d.shape[0]))
    stack[0] = lb
    stack[1] = d
    stack[2] = 1.0
    fill_moments(stack)
    return stack


def fill_moments(stack: FloatArray) -> None:
    """Rows 3–4 of `stack` (d², d³) from row 1 (d), so that with row 2 = 1, `stack[1:] @ w` =
    Σwd, Σw, Σwd², Σwd³ in one call. Row 2 is the caller's (see `stacked`)."""
    np.multiply(stack[1], stack[1], out=stack[3])
    np.multiply(stack[3], stack[1], out=stack[4])


def evaluate(stack: FloatArray, alpha: float) -> Point:
    """q_α, g(α), g′(α) and g″(α). `stack` = rows log p_b, d, 1, d², d³ (`stacked`) over one
    support where log p_b, log p_t are normalized: then x ≤ 0, so exp(x) never overflows and
    the max needs subtracting only when everything underflows."""
    return _evaluate(stack[:2], stack[1:], np.array((1.0, alpha)))


def _evaluate(logs: FloatArray, moments: FloatArray, coefficients: FloatArray) -> Point:
    """`evaluate` at α = coefficients[1], from the views the solver slices once."""
    alpha = float(coefficients[1])
    x = coefficients.dot(logs)  # log p_b + α·d in one call
    w = np.exp(x)
    s1, z, s2, s3 = moments.dot(w).tolist()
    shift = 0.0
    if z < _UNDERFLOW:
        shift = float(np.maximum.reduce(x))
        w = np.exp(x - shift)
        s1, z, s2, s3 = moments.dot(w).tolist()
    g = s1 / z
    second = s2 / z
    var = second - g * g
    skew = s3 / z - 3.0 * g * second + 2.0 * g * g * g
    return Point(alpha, g, var if var > 0.0 else 0.0, skew, x, shift, w, z)


def evaluate_plain(stack: FloatArray, alpha: float) -> Point:
    """q_α and g(α) at an imposed α from rows 0–2 of `stack` (log p_b, d, 1) only: the α rules
    that do not solve need neither g′ nor g″ (`var` and `skew` are reported as 0)."""
    x = np.array((1.0, alpha)).dot(stack[:2])
    w = np.exp(x)
    s1, z = stack[1:3].dot(w).tolist()
    shift = 0.0
    if z < _UNDERFLOW:
        shift = float(np.maximum.reduce(x))
        w = np.exp(x - shift)
        s1, z = stack[1:3].dot(w).tolist()
    return Point(alpha, s1 / z, 0.0, 0.0, x, shift, w, z)


def solve(stack: FloatArray, alpha_hint: float | None, zero_below: float = 0.0) -> Point | None:
    """The root of g on [0, 1] by safeguarded Newton/Halley (a bracket is kept; a step that
    leaves it or does not halve the step before last is replaced by bisection, as in Numerical
    Recipes' rtsafe), warm-started from `alpha_hint` (the previous step's α of this sequence).

    Stops when |g| ≤ G_TOLERANCE or when the bracket holds no other float; the latter happens
    only when Var_q[d] is huge (e.g. temperatures near 1e-5, where one ulp of α moves g by
    more than 1e-9), and then the point with the smallest |g| seen is returned.

    Returns None, without solving, when max |d| < `zero_below` (§5 rule 4, "identical"). That
    max is looked at only if the first point has E_q[d²] < 2·zero_below², since
    E_q[d²] ≤ max d² (it is one numpy call per step saved).
    """
    lo, hi = 0.0, 1.0
    alpha = 0.5
    if alpha_hint is not None and 0.0 < alpha_hint < 1.0:
        alpha = alpha_hint
    step = step_before = 1.0
    logs, moments = stack[:2], stack[1:]
    coefficients = np.array((1.0, alpha))
    point = best = _evaluate(logs, moments, coefficients)
    limit = zero_below * zero_below
    if point.var + point.g * point.g < 2.0 * limit and float(np.maximum.reduce(stack[3])) < limit:
        return None
    best_gap = abs(point.g)
    for _ in range(MAX_EVALUATIONS):
        g, var, skew = point.g, point.var, point.skew
        gap = abs(g)
        if gap < best_gap:
            best, best_gap = point, gap
        if gap <= G_TOLERANCE:
            return point
        if g < 0.0:
            lo = alpha
        else:
            hi = alpha
        candidate = math.nan
        if var > 0.0:
            newton = g / var
            correction = 0.5 * newton * skew / var
            if -0.5 < correction < 0.5:  # Halley: g/g′ / (1 − g·g″ / 2g′²)
                newton /= 1.0 - correction
            candidate = alpha - newton
            if lo < candidate < hi and abs(2.0 * newton) <= abs(step_before):
                step_before, step = step, newton
            else:
                candidate = math.nan
        if candidate != candidate:  # no usable Newton step: bisect
            step_before, step = step, 0.5 * (hi - lo)
            candidate = lo + step
        if not lo < candidate < hi or candidate == alpha:
            break  # the bracket holds no other float
        alpha = candidate
        coefficients[1] = alpha
        point = _evaluate(logs, moments, coefficients)
    return point if abs(point.g) < best_gap else best
