"""The deterministic core of one mixing step (docs/ALGORITHM.md §1–5) as one numba kernel.

`mix_kernel` runs alignment and fill (§1), temperature (§2), the stability diagnostics (§3),
the trust region (§4), the α rules and the safeguarded Newton/Halley solver (§5), q_α, and the
request's top_k/top_p, on arrays of a few dozen ids. In numpy that was ~75 calls of ~0.5 µs
overhead each; compiled, the whole step is one call. Everything here is plain loops over
float64/int64 arrays, in the order of the spec.

Imported lazily (by `app.sampling.mixing` on first use or by `app.sampling.warm_up`): importing
numba costs ~0.5 s, and compilation happens on the first call (`cache=True`: later processes
load the machine code from numba's cache, NUMBA_CACHE_DIR or __pycache__).

Inputs are validated in Python before the kernel (`app.sampling.mixing`): logprobs are finite or
below -9999 (never NaN/+inf), options are in range. The kernel reports the two input errors it
finds while aligning (negative or duplicate ids) as a status code, and never raises.

Numerical conventions (every output stays finite; NaN never escapes):
- vLLM's -9999 clamp is kept as the finite log-probability -9999, so d = log p_t − log p_b is
  finite everywhere.
- Temperatures below 1e-5 are greedy, as in vLLM (`_SAMPLING_EPS`); this also bounds 1/T.
- Ids outside the trust region stay in the arrays with log p_b = -inf and d = 0, so q = 0 there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
_F = TypeVar("_F", bound=Callable[..., Any])


def _jit(function: _F) -> _F:
    """numba.njit with the on-disk cache, compiled on the first call (nothing at import).

    No fastmath: the kernel must give IEEE results (ties, exact zeros, -inf stay what they are)."""
    return cast(_F, numba.njit(cache=True, nogil=True)(function))


CLAMP_LOGPROB = -9999.0  # vLLM's -inf (see topk.CLAMP_LOGPROB)
FILL_FLOOR = 1e-10  # §1: the smallest value a missing id gets
LOG_FILL_FLOOR = math.log(FILL_FLOOR)
IDENTICAL_TOLERANCE = 1e-12  # §5.4
GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: below it, sampling is greedy
LN2 = math.log(2.0)
# Solve to well inside the required |g| ≤ 1e-9 so an independent recomputation of the two KLs
# (different rounding) still lands below 1e-9.
G_TOLERANCE = 1e-10
# Bisection from [0, 1] exhausts float64 resolution in about 60 halvings for roots away from 0;
# the cap only matters for pathological inputs, where the best point seen is returned.
MAX_EVALUATIONS = 200
# z below this: the weights underflowed badly (only with extreme, near-disjoint inputs), so
# q_α is recomputed with the largest exponent subtracted. Also: Σ_N p_b below this is
# recomputed by log-sum-exp.
UNDERFLOW = 1e-150
# exp(−700)/|S| is far from underflow: a row whose logs span less than this has every p > 0.
NO_UNDERFLOW_SPAN = 700.0
# e^top above this: Σ e^lp / e^top is as exact as Σ e^(lp − top) (no subnormal ratios).
SUBNORMAL_SAFE = 1e-290

# §4 and top_p: a cumulative mass within this relative distance of the target reaches it.
TIE_TOLERANCE = 1e-12

# Status codes of `mix_kernel` (the caller raises SamplingError for the non-zero ones).
OK = 0
NEGATIVE_ID = 1
DUPLICATE_ID = 2
# Reason codes: indices into app.sampling.types.REASONS.
FIRST_TOKEN, FIXED, UNSTABLE, IDENTICAL, SINGLE_TOKEN, SOLVED = 0, 1, 2, 3, 4, 5
NO_ALPHA = -1.0  # "None" for the optional α inputs (fixed α, warm start)


@_jit
def log_fill(values: FloatArray, lo: int, hi: int, missing: int) -> float:
    """§1: log of the value every id one model did not return gets,
    max(min(min known P, tail / |missing|), 1e-10), for the model at values[lo:hi] (clamped
    logprobs), `missing` = |U_m| ids.

    τ = 1 − M as −expm1(top + log1p(Σ_{others} e^(lp − top))): no cancellation when M ≈ 1
    (1 − Σ e^lp would put an error of ulp(1)/τ into log fill, hence into d)."""
    at = lo  # the first maximum
    low = values[lo]
    for i in range(lo + 1, hi):
        if values[i] > values[at]:
            at = i
        if values[i] < low:
            low = values[i]
    top = values[at]
    e_top = math.exp(top)
    others = 0.0
    if e_top > SUBNORMAL_SAFE:
        for i in range(lo, hi):
            if i != at:
                others += math.exp(values[i])
        others /= e_top
    else:  # e^top (nearly) underflowed: the ratios straight from the logs
        for i in range(lo, hi):
            if i != at:
                others += math.exp(values[i] - top)
    tail = -math.expm1(top + math.log1p(others))
    share = tail / missing if tail > 0.0 else 0.0
    smallest = math.exp(low)
    if share < smallest:
        return math.log(share if share > FILL_FLOOR else FILL_FLOOR)
    # The fill is the smallest known value: its log exactly, so the tie with that id stays an
    # exact tie (broken by id, §4) instead of depending on the rounding of log(exp(low)).
    return low if smallest > FILL_FLOOR else LOG_FILL_FLOOR


@_jit
def _weights(
    x: FloatArray, d: FloatArray, shift: float, moments: bool, w: FloatArray
) -> tuple[float, float, float, float]:
    """w = exp(x − shift) into `w`; returns Σwd, Σw and, if `moments`, Σwd², Σwd³ (else 0)."""
    s1 = z = s2 = s3 = 0.0
    for j in range(x.shape[0]):
        wj = math.exp(x[j] - shift)
        w[j] = wj
        z += wj
        s1 += wj * d[j]
        if moments:
            dd = d[j] * d[j]
            s2 += wj * dd
            s3 += wj * (dd * d[j])
    return s1, z, s2, s3


@_jit
def evaluate(
    lb: FloatArray, d: FloatArray, alpha: float, moments: bool, x: FloatArray, w: FloatArray
) -> tuple[float, float, float, float, float]:
    """q_α on the current support: x = (1−α) log p_b + α log p_t = log p_b + α·d and
    w = exp(x − shift) into `x`, `w`; returns (g, var, skew, shift, z) with g = E_q[d] =
    KL(q‖p_b) − KL(q‖p_t), var = Var_q[d] = g′(α), skew = E_q[(d − g)³] = g″(α) (both 0 unless
    `moments`), z = Σw, so log q = x − shift − log z and Σ p_b^(1−α) p_t^α = z·e^shift.

    log p_b, log p_t are normalized, so x ≤ 0 and exp never overflows; the max is subtracted
    only when everything underflows (z < 1e-150)."""
    for j in range(lb.shape[0]):
        x[j] = lb[j] + alpha * d[j]
    shift = 0.0
    s1, z, s2, s3 = _weights(x, d, shift, moments, w)
    if z < UNDERFLOW:
        shift = x.max()
        s1, z, s2, s3 = _weights(x, d, shift, moments, w)
    g = s1 / z
    if not moments:
        return g, 0.0, 0.0, shift, z
    second = s2 / z
    var = second - g * g
    skew = s3 / z - 3.0 * g * second + 2.0 * g * g * g
    return g, var if var > 0.0 else 0.0, skew, shift, z


@_jit
def solve(
    lb: FloatArray,
    d: FloatArray,
    alpha_hint: float,
    zero_below: float,
    x: FloatArray,
    w: FloatArray,
) -> tuple[bool, float, float, float, float]:
    """§5.5: the root of g on [0, 1] by safeguarded Newton/Halley (a bracket is kept; a step
    that leaves it or does not halve the step before last is replaced by bisection, as in
    Numerical Recipes' rtsafe), warm-started from `alpha_hint` (the previous step's α; NO_ALPHA
    or outside (0, 1): start at 0.5). Halley's step (g″ is free with the moments) is used
    whenever its correction is small, else Newton's.

    Stops when |g| ≤ G_TOLERANCE or when the bracket holds no other float; the latter happens
    only when Var_q[d] is huge (e.g. temperatures near 1e-5, where one ulp of α moves g by more
    than 1e-9), and then the point with the smallest |g| seen is returned.

    Returns (found, α, g, shift, z) with q_α in `x`, `w`. found = False, without solving, when
    max |d| < `zero_below` (§5 rule 4, "identical"); that max is looked at only if the first
    point has E_q[d²] < 2·zero_below², since E_q[d²] ≤ max d²."""
    lo, hi = 0.0, 1.0
    alpha = 0.5
    if 0.0 < alpha_hint < 1.0:
        alpha = alpha_hint
    step = step_before = 1.0
    g, var, skew, shift, z = evaluate(lb, d, alpha, True, x, w)
    limit = zero_below * zero_below
    if var + g * g < 2.0 * limit:
        largest = 0.0
        for j in range(d.shape[0]):
            largest = max(largest, d[j] * d[j])
        if largest < limit:
            return False, 0.5, g, shift, z
    best_alpha, best_gap = alpha, abs(g)
    for _ in range(MAX_EVALUATIONS):
        gap = abs(g)
        if gap < best_gap:
            best_alpha, best_gap = alpha, gap
        if gap <= G_TOLERANCE:
            return True, alpha, g, shift, z
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
        g, var, skew, shift, z = evaluate(lb, d, alpha, True, x, w)
    if abs(g) < best_gap:
        return True, alpha, g, shift, z
    # The best point seen: evaluate it again (the same arithmetic gives the same q_α).
    g, _, _, shift, z = evaluate(lb, d, best_alpha, True, x, w)
    return True, best_alpha, g, shift, z


@_jit
def crossing(cumulative: FloatArray, p: float) -> int:
    """The number of leading entries of `cumulative` (non-decreasing) needed to reach
    p·cumulative[-1], the crossing entry included (searchsorted + 1).

    "Reach" allows a relative 1e-12 for rounding: when the exact cumulative mass equals p (a
    tie, e.g. q = 0.4 and top_p = 0.4), whether its float lands a few ulps above or below
    p·total depends on summation order alone; the tie then counts as reached, as in exact
    arithmetic. 1e-12 is far above rounding (~|S|·1e-16) and far below any real difference."""
    target = p * cumulative[-1] * (1.0 - TIE_TOLERANCE)
    for i in range(cumulative.shape[0]):
        if cumulative[i] >= target:
            return i + 1
    return int(cumulative.shape[0]) + 1


@_jit
def request_filter(x: FloatArray, q: FloatArray, top_k: int, top_p: float) -> IntArray:
    """Positions kept by the request's top_k then top_p (vLLM's order: top_p acts on the
    top_k-renormalized q), sorted; empty when nothing is dropped. Ordered by log q (x), which
    ranks like q but stays distinct where q underflows; ties: lower id first (stable sort)."""
    n = x.shape[0]
    if not (0 < top_k < n or top_p < 1.0):
        return np.empty(0, np.int64)
    order = np.argsort(-x, kind="mergesort")
    if 0 < top_k < n:
        order = order[:top_k]
    if top_p < 1.0:
        cumulative = np.cumsum(q[order])
        order = order[: crossing(cumulative, top_p)]
    if order.shape[0] == n:
        return np.empty(0, np.int64)
    return np.sort(order)


@_jit
def mix_kernel(
    ids: IntArray,
    logprobs: FloatArray,
    kb: int,
    temperature: float,
    rho: float,
    force_first_token: bool,
    first_token: bool,
    fixed_alpha: float,
    stability_check: bool,
    js_threshold: float,
    overlap_threshold: float,
    auto_fallback: bool,
    alpha_hint: float,
    top_k: int,
    top_p: float,
) -> tuple[
    int, IntArray, FloatArray, FloatArray, int, float, int, float, int, float, float, float, float
]:
    """One step's q and diagnostics. `ids`, `logprobs`: the base's top-K (first `kb` entries)
    then the teacher's; `rho` = 1.0 for no trust region; `fixed_alpha`, `alpha_hint` =
    NO_ALPHA for none. Returns (status, support, logq, q, greedy position or -1, α, reason
    code, js, overlap_count, overlap_mass, kl_gap, chernoff, filled_mass); see
    `app.sampling.mixing.mix` for the definitions."""
    m = ids.shape[0]
    values = np.maximum(logprobs, CLAMP_LOGPROB)  # below the clamp (-inf included) is the clamp

    # §1: one support S (sorted union of ids), fills for what each model did not return.
    merged = np.sort(ids)
    if merged[0] < 0:
        return _failure(NEGATIVE_ID)
    n = 1
    for i in range(1, m):
        if merged[i] != merged[i - 1]:
            merged[n] = merged[i]
            n += 1
    support = merged[:n].copy()
    # known[0, j]: the base returned support[j]; known[1, j]: the teacher did.
    known = np.zeros((2, n), np.bool_)
    position = np.searchsorted(support, ids)
    for i in range(m):
        row = 0 if i < kb else 1
        if known[row, position[i]]:
            return _failure(DUPLICATE_ID)
        known[row, position[i]] = True
    shared = known[0] & known[1]  # K_b ∩ K_t
    overlap_count = int(shared.sum())
    kt = m - kb
    lb = np.empty(n)  # log p_b over S, then (§4) restricted; log q_α is built from it
    lt = np.empty(n)  # log p_t over S
    b_fill = t_fill = -math.inf
    if n > kb:
        b_fill = log_fill(values, 0, kb, n - kb)
        lb[:] = b_fill
    if n > kt:
        t_fill = log_fill(values, kb, m, n - kt)
        lt[:] = t_fill
    b_top, b_low = values[:kb].max(), values[:kb].min()
    t_top, t_low = values[kb:].max(), values[kb:].min()
    for i in range(m):
        if i < kb:
            lb[position[i]] = values[i]
        else:
            lt[position[i]] = values[i]

    # §2: temperature on both models (T = 0: everything at T = 1, then argmax). Per row:
    # subtract the max, scale by 1/T, exp, normalize.
    greedy = temperature < GREEDY_TEMPERATURE
    inverse_t = 1.0 if greedy else 1.0 / temperature
    b_shift, t_shift = max(b_top, b_fill), max(t_top, t_fill)
    pb = np.empty(n)
    pt = np.empty(n)
    b_total = t_total = 0.0
    for j in range(n):
        lb[j] = (lb[j] - b_shift) * inverse_t
        lt[j] = (lt[j] - t_shift) * inverse_t
        pb[j] = math.exp(lb[j])
        pt[j] = math.exp(lt[j])
        b_total += pb[j]
        t_total += pt[j]
    b_log_total, t_log_total = math.log(b_total), math.log(t_total)
    for j in range(n):
        pb[j] /= b_total
        pt[j] /= t_total
        lb[j] -= b_log_total
        lt[j] -= t_log_total

    # §3: stability diagnostics on all of S.
    # JS = ½[Σ p_b log p_b + Σ p_t log p_t − Σ s log(s/2)], s = p_b + p_t (Σ s = 2): one log
    # per id; 0·log 0 terms vanish because the logs are finite (s = 0 only when both
    # underflow, where the 1e-300 keeps log finite and the term is 0; it is added only when a
    # row's logs span more than 700, the only case where a p can underflow to 0).
    b_span = (b_shift - (b_low if b_fill == -math.inf else min(b_low, b_fill))) * inverse_t
    t_span = (t_shift - (t_low if t_fill == -math.inf else min(t_low, t_fill))) * inverse_t
    guard = 1e-300 if b_span > NO_UNDERFLOW_SPAN and t_span > NO_UNDERFLOW_SPAN else 0.0
    entropy_terms = mixed_terms = b_overlap = t_overlap = 0.0
    for j in range(n):
        s = pb[j] + pt[j] + guard
        entropy_terms += pb[j] * lb[j] + pt[j] * lt[j]
        mixed_terms += s * math.log(s)
        if shared[j]:
            b_overlap += pb[j]
            t_overlap += pt[j]
    js = 0.5 * (entropy_terms - mixed_terms) + LN2
    js = min(max(js, 0.0), LN2)  # rounding can step outside [0, ln 2]
    overlap_mass = min(b_overlap, t_overlap)
    unstable = js > js_threshold or overlap_mass < overlap_threshold

    d = lt - lb  # d = log p_t − log p_b

    # §4: trust region on the teacher, before α: N = the fewest ids with the largest p_t
    # reaching ρ (crossing id included, ties: lower id first); p_b and p_t renormalized on N.
    single = False
    if rho < 1.0:
        order = np.argsort(-pt, kind="mergesort")  # stable: ties keep id order
        b_cumulative = np.cumsum(pb[order])
        t_cumulative = np.cumsum(pt[order])
        count = crossing(t_cumulative, rho)
        single = count == 1
        if count < n:
            nucleus, outside = order[:count], order[count:]
            mass_b = b_cumulative[count - 1]
            if mass_b > UNDERFLOW:
                log_mass_b = math.log(mass_b)
            else:  # p_b underflowed on the nucleus: log Σ_N p_b by log-sum-exp
                kept = lb[nucleus]
                top = kept.max()
                log_mass_b = top + math.log(np.exp(kept - top).sum())
            shift_d = log_mass_b - math.log(t_cumulative[count - 1])
            for j in range(n):
                lb[j] -= log_mass_b
                d[j] += shift_d
            lb[outside] = -math.inf
            d[outside] = 0.0
            if single:  # exactly q = 1 on that id: logprob 0, kl_gap 0, chernoff 0
                lb[nucleus] = 0.0
                d[nucleus] = 0.0

    # §5: α (first rule that applies), then q_α in x (log, unnormalized) and w = exp(x − shift).
    x = np.empty(n)
    w = np.empty(n)
    reason = SOLVED
    alpha = NO_ALPHA
    if single:  # the nucleus leaves nothing to mix: wins over every §5 rule
        reason = SINGLE_TOKEN
        g, _, _, shift, z = evaluate(lb, d, 1.0, False, x, w)
    else:
        if force_first_token and first_token:  # rule 1
            alpha, reason = 1.0, FIRST_TOKEN
        elif fixed_alpha != NO_ALPHA:  # rule 2
            alpha, reason = fixed_alpha, FIXED
        elif stability_check and unstable and auto_fallback:  # rule 3
            alpha, reason = 1.0, UNSTABLE
        if reason != SOLVED:
            g, _, _, shift, z = evaluate(lb, d, alpha, False, x, w)
        else:  # rule 5, unless rule 4 (max |d| < 1e-12) applies
            found, alpha, g, shift, z = solve(lb, d, alpha_hint, IDENTICAL_TOLERANCE, x, w)
            if not found:
                alpha, reason = 0.5, IDENTICAL
                g, _, _, shift, z = evaluate(lb, d, 0.5, True, x, w)

    # q_α, then the request's top_k / top_p on it (renormalized).
    greedy_position = int(np.argmax(x)) if greedy else -1  # the first maximum: lowest id
    log_norm = shift + math.log(z)
    q = w / z
    logq = x - log_norm
    keep = request_filter(x, q, top_k, top_p)
    if keep.shape[0] > 0:
        mass = q[keep].sum()
        log_mass = math.log(mass)
        kept_q = q[keep] / mass
        kept_logq = logq[keep] - log_mass
        q[:] = 0.0
        logq[:] = -math.inf
        q[keep] = kept_q
        logq[keep] = kept_logq
    known_mass = 0.0
    for j in range(n):
        if shared[j]:
            known_mass += q[j]
    filled_mass = 1.0 - known_mass  # q off the ids both models returned
    chernoff = -log_norm
    return (
        OK,
        support,
        logq,
        q,
        greedy_position,
        alpha,
        reason,
        js,
        overlap_count,
        min(overlap_mass, 1.0),
        abs(g),
        max(chernoff, 0.0),
        min(max(filled_mass, 0.0), 1.0),
    )


@_jit
def _failure(
    status: int,
) -> tuple[
    int, IntArray, FloatArray, FloatArray, int, float, int, float, int, float, float, float, float
]:
    empty = np.empty(0)
    return (status, np.empty(0, np.int64), empty, empty, -1, 0.0, 0, 0.0, 0, 0.0, 0.0, 0.0, 0.0)
