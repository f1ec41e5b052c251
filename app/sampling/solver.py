"""The root of g(α) = E_{q_α}[d] on [0, 1] (ALGORITHM.md §5.5), and q_α itself.

q_α ∝ p_b^(1−α) p_t^α with d = log p_t − log p_b; g(α) = KL(q_α‖p_b) − KL(q_α‖p_t) and
g′(α) = Var_{q_α}[d] ≥ 0, so the root is unique and bracketed by [0, 1].

Plain Python floats and `math`: on the few dozen ids of one step this beats numpy, whose
per-call overhead (~1 µs here) dominates arrays this small (measured, bench/sampling.py).
"""

from __future__ import annotations

import math
from operator import mul
from typing import NamedTuple

# Solve to well inside the required |g| ≤ 1e-9 so an independent recomputation of the two
# KLs (different rounding) still lands below 1e-9.
G_TOLERANCE = 1e-10
# Bisection from [0, 1] exhausts float64 resolution in about 60 halvings for roots away from 0;
# the cap only matters for pathological inputs, where the best point seen is returned.
MAX_EVALUATIONS = 200

_exp = math.exp


class Point(NamedTuple):
    """q_α on the current support, in a form that makes every §6 output free.

    log q_i = x_i − shift − log(z); q_i = w_i / z; Σ p_b^(1−α) p_t^α = z·e^shift.
    """

    alpha: float
    g: float  # E_q[d] = KL(q‖p_b) − KL(q‖p_t)
    var: float  # Var_q[d] = g′(α)
    x: list[float]  # (1−α) log p_b + α log p_t
    shift: float  # max(x)
    w: list[float]  # exp(x − shift)
    z: float  # Σ w

    @property
    def chernoff(self) -> float:
        """−log Σ p_b^(1−α) p_t^α (the Chernoff information at α* when α = α*)."""
        return -(self.shift + math.log(self.z))


def evaluate(lb: list[float], d: list[float], d2: list[float], alpha: float) -> Point:
    """q_α, g(α) and g′(α) in one pass (log space, max subtracted before exp: no overflow,
    and z ≥ 1 so no division by zero)."""
    x = [b + alpha * e for b, e in zip(lb, d, strict=True)]
    shift = max(x)
    w = [_exp(v - shift) for v in x]
    z = sum(w)
    g = sum(map(mul, w, d)) / z
    var = sum(map(mul, w, d2)) / z - g * g
    return Point(alpha, g, var if var > 0.0 else 0.0, x, shift, w, z)


def solve(lb: list[float], d: list[float], alpha_hint: float | None) -> Point:
    """The root of g on [0, 1] by safeguarded Newton (a bracket is kept; a step that leaves it
    or does not halve the step before last is replaced by bisection, as in Numerical Recipes'
    rtsafe), warm-started from `alpha_hint` (the previous step's α of this sequence).

    Stops when |g| ≤ G_TOLERANCE or when the bracket has shrunk to adjacent floats; in the
    latter case (only when Var_q[d] is huge, e.g. near-zero temperatures, where one ulp of α
    moves g by more than 1e-9) the point with the smallest |g| seen is returned.
    """
    d2 = [e * e for e in d]
    lo, hi = 0.0, 1.0
    alpha = 0.5
    if alpha_hint is not None and 0.0 < alpha_hint < 1.0:
        alpha = alpha_hint
    step = step_before = 1.0
    point = best = evaluate(lb, d, d2, alpha)
    for _ in range(MAX_EVALUATIONS):
        g = point.g
        if abs(g) < abs(best.g):
            best = point
        if abs(g) <= G_TOLERANCE:
            return point
        if g < 0.0:
            lo = alpha
        else:
            hi = alpha
        candidate = math.nan
        if point.var > 0.0:
            newton = g / point.var
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
        point = evaluate(lb, d, d2, alpha)
    return point if abs(point.g) < abs(best.g) else best
