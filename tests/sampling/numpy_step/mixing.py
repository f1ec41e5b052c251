"""One mixing step: align, temper, diagnose, trust region, α, q (docs/ALGORITHM.md §1–5).

`mix` is the deterministic part (q and the diagnostics, no randomness); app.sampling's
`mix_step` adds the draw. A step touches a few dozen ids, where numpy's per-call
overhead (not the arithmetic) is the cost, so the code counts calls (bench/sampling.py): the
two models live in one 2×|S| array (one call per operation for both), one 5×|S| buffer holds
log p_b, d and the solver's moment rows, `ndarray.dot`/`take` replace `@`/fancy 2-D indexing
(about half the overhead), no reductions where a bound is known, and scalar work happens in
Python floats.

Numerical conventions (every output stays finite; NaN never escapes):
- vLLM's -9999 clamp is kept as the finite log-probability -9999 (see `topk.CLAMP_LOGPROB`),
  so d = log p_t − log p_b is finite everywhere.
- Temperatures below 1e-5 are greedy, as in vLLM (`_SAMPLING_EPS`); this also bounds 1/T.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from app.sampling.mixing import (  # the input checks are not under comparison
    _checked,
    validate_config,
)
from app.sampling.topk import CLAMP_LOGPROB, POSITIVE_TOLERANCE
from app.sampling.types import MixConfig, Mixture, Reason, SamplingError, TopK
from tests.sampling.numpy_step.solver import Point, evaluate, evaluate_plain, fill_moments, solve

FILL_FLOOR = 1e-10  # §1: the smallest value a missing id gets
_LOG_FILL_FLOOR = math.log(FILL_FLOOR)
IDENTICAL_TOLERANCE = 1e-12  # §5.4
GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: below it, sampling is greedy
_LN2 = math.log(2.0)
# ufunc methods and C-level fills: ndarray.sum / np.full / np.cumsum go through Python
# wrappers that cost more than the arithmetic on arrays this small (measured ~2x).
_sum = np.add.reduce
_accumulate = np.add.accumulate
_UNDERFLOW = 1e-150
# exp(−700)/|S| is far from underflow: a row whose logs span less than this has every p > 0.
_NO_UNDERFLOW_SPAN = 700.0
# e^top above this: Σ e^lp / e^top is as exact as Σ e^(lp − top) (no subnormal ratios).
_SUBNORMAL_SAFE = 1e-290

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def mix(
    base: TopK,
    teacher: TopK,
    config: MixConfig,
    *,
    first_token: bool,
    alpha_hint: float | None = None,
) -> Mixture:
    """The same contract as `app.sampling.mix` (see its docstring), computed in numpy."""
    validate_config(config)
    b_ids, b_logprobs = _checked(base, "base")
    t_ids, t_logprobs = _checked(teacher, "teacher")
    kb, kt = b_ids.shape[0], t_ids.shape[0]
    m = kb + kt
    # Both models travel as one array from here on (base first, then teacher): one numpy call
    # per operation instead of two, since per-call overhead, not arithmetic, is the cost.
    logprobs = np.concatenate((b_logprobs, t_logprobs))
    values: list[float] = logprobs.tolist()
    b_top, b_low, b_top_index = _extremes(values[:kb], "base")
    t_top, t_low, t_top_index = _extremes(values[kb:], "teacher")
    if b_low < CLAMP_LOGPROB or t_low < CLAMP_LOGPROB:
        np.maximum(logprobs, CLAMP_LOGPROB, out=logprobs)
        values = logprobs.tolist()
        b_low, b_top = max(b_low, CLAMP_LOGPROB), max(b_top, CLAMP_LOGPROB)
        t_low, t_top = max(t_low, CLAMP_LOGPROB), max(t_top, CLAMP_LOGPROB)

    # §1: one support S (sorted union of ids), fills for what each model did not return.
    ids = np.concatenate((b_ids, t_ids))
    merged = ids.copy()
    merged.sort()
    if merged.item(0) < 0:
        raise SamplingError("negative token id in top-K logprobs")
    first = np.empty(m, dtype=bool)
    first[0] = True
    np.not_equal(merged[1:], merged[:-1], out=first[1:])
    support = merged[first]
    n = support.shape[0]
    # Positions in a 2×|S| layout, row 0 = base, row 1 = teacher (flat index).
    flat = support.searchsorted(ids)
    teacher_part = flat[kb:]
    teacher_part += n
    known = np.zeros(2 * n)
    known[flat] = 1.0
    shared = known[:n] * known[n:]  # 1.0 on K_b ∩ K_t
    overlap_count = int(shared.dot(shared))  # ndarray.dot: half the overhead of @ or sum
    if m - n != overlap_count:  # |K_b| + |K_t| − |S| counts duplicates too
        raise SamplingError("duplicate token id in top-K logprobs")
    # One buffer for the whole step: rows log p_b, log p_t (then d = log p_t − log p_b), and
    # the solver's 1, d², d³ (solver.py reads rows 0–1 as [log p_b; d], rows 1–4 as moments).
    buffer = np.empty(5 * n)
    b_fill = t_fill = -math.inf
    if n > kb or n > kt:
        exps: list[float] = np.exp(logprobs).tolist()
        if n > kb:
            b_fill = _log_fill(exps, 0, kb, values, b_top, b_top_index, b_low, n - kb)
            buffer[:n] = b_fill
        if n > kt:
            t_fill = _log_fill(exps, kb, m, values, t_top, t_top_index, t_low, n - kt)
            buffer[n : 2 * n] = t_fill
    buffer[flat] = logprobs
    stack = buffer.reshape(5, n)
    logs = stack[:2]
    ones = stack[2]
    ones.fill(1.0)

    # §2: the temperature applies to both models (T = 0: everything at T = 1, then argmax).
    # Per row: subtract the max (a known scalar, no reduction) and scale by 1/T, then exp and
    # normalize.
    temperature = config.temperature
    greedy = temperature < GREEDY_TEMPERATURE
    inverse_t = 1.0 if greedy else 1.0 / temperature
    b_shift, t_shift = max(b_top, b_fill), max(t_top, t_fill)
    logs -= np.array(((b_shift,), (t_shift,)))
    if inverse_t != 1.0:
        logs *= inverse_t
    probs = np.exp(logs)
    totals = probs.dot(ones).reshape(2, 1)
    probs /= totals
    logs -= np.log(totals, out=totals)
    lb = stack[0]  # log p_b over S
    pb, pt = probs[0], probs[1]

    # §3: stability diagnostics on all of S.
    # JS = ½[Σ p_b log p_b + Σ p_t log p_t − Σ s log(s/2)], s = p_b + p_t (Σ s = 2): one log
    # per id; 0·log 0 terms vanish because the logs are finite (s = 0 only when both
    # underflow, where the 1e-300 keeps log finite and the term is 0; it is added only when a
    # row's logs span more than 700, the only case where a p can underflow to 0).
    s = pb + pt
    b_span = (b_shift - (b_low if b_fill == -math.inf else min(b_low, b_fill))) * inverse_t
    t_span = (t_shift - (t_low if t_fill == -math.inf else min(t_low, t_fill))) * inverse_t
    if b_span > _NO_UNDERFLOW_SPAN and t_span > _NO_UNDERFLOW_SPAN:
        s += 1e-300
    js = 0.5 * (float(np.vdot(probs, logs)) - float(s.dot(np.log(s)))) + _LN2
    js = min(max(js, 0.0), _LN2)  # rounding can step outside [0, ln 2]
    b_overlap, t_overlap = probs.dot(shared).tolist()
    overlap_mass = min(b_overlap, t_overlap)
    unstable = js > config.js_threshold or overlap_mass < config.overlap_threshold

    d = stack[1]
    d -= lb  # d = log p_t − log p_b

    # §4: trust region on the teacher, before α. Ids outside the nucleus stay in the arrays
    # with log p_b = -inf and d = 0 (so q = 0 there and nothing needs gathering/scattering).
    single = False
    rho = config.trust_region_top_p
    if rho is not None and rho < 1.0:
        order = (-pt).argsort(kind="stable")  # stable: ties keep id order, lower id first
        # Cumulative p_b and p_t in the teacher's order, in one gather and one accumulate.
        cumulative = _accumulate(probs.take(order, 1), 1)  # take: 7x cheaper than [:, order]
        t_cumulative = cumulative[1]
        count = int(t_cumulative.searchsorted(rho * t_cumulative[-1])) + 1  # crossing included
        single = count == 1
        if count < n:
            nucleus, outside = order[:count], order[count:]
            mass_b = float(cumulative[0, count - 1])
            # log Σ_N p_b; by log-sum-exp if p_b underflowed on the nucleus (the base puts
            # almost no mass there).
            log_mass_b = math.log(mass_b) if mass_b > _UNDERFLOW else _log_sum_exp(lb[nucleus])
            lb -= log_mass_b
            lb[outside] = -np.inf
            d += log_mass_b - math.log(float(t_cumulative[count - 1]))
            d[outside] = 0.0
            if single:  # exactly q = 1 on that id: logprob 0, kl_gap 0, chernoff 0
                lb[nucleus] = 0.0
                d[nucleus] = 0.0

    # §5: α (first rule that applies), then q_α. Only rules 4–5 need the moments rows.
    alpha: float | None
    reason: Reason
    point: Point
    if single:
        alpha, reason = None, "single_token"
        point = evaluate_plain(stack, 1.0)
    else:
        if config.force_first_token and first_token:
            alpha, reason = 1.0, "first_token"
        elif config.alpha is not None:
            alpha, reason = float(config.alpha), "fixed"
        elif config.stability_check and unstable and config.auto_fallback:
            alpha, reason = 1.0, "unstable"
        else:
            alpha, reason = None, "solved"
        if alpha is not None:
            point = evaluate_plain(stack, alpha)
        else:
            fill_moments(stack)
            solved = solve(stack, alpha_hint, IDENTICAL_TOLERANCE)  # None: rule 4 applies
            if solved is None:
                alpha, reason = 0.5, "identical"
                point = evaluate(stack, 0.5)
            else:
                point = solved
                alpha = point.alpha

    # q_α, then the request's top_k / top_p on it.
    x = point.x
    greedy_token = None
    if greedy:  # argmax returns the first maximum: the lowest id
        greedy_token = int(support[int(x.argmax())])
    log_norm = point.shift + math.log(point.z)
    q = point.w / point.z
    logq = x - log_norm
    top_k, top_p = config.top_k, config.top_p
    keep = _request_filter(x, q, top_k, top_p) if top_k > 0 or top_p < 1.0 else None
    if keep is not None:
        mass = float(_sum(q[keep]))
        kept_q = q[keep] / mass
        kept_logq = logq[keep] - math.log(mass)
        q = np.zeros(n)
        q[keep] = kept_q
        logq = _filled(n, -np.inf)
        logq[keep] = kept_logq
    filled_mass = 1.0 - float(q.dot(shared))  # q off the ids both models returned
    chernoff = -log_norm
    return Mixture(
        support,
        logq,
        q,
        greedy_token,
        alpha,
        reason,
        js,
        overlap_count,
        overlap_mass if overlap_mass < 1.0 else 1.0,
        abs(point.g),
        chernoff if chernoff > 0.0 else 0.0,
        min(max(filled_mass, 0.0), 1.0),
    )


def _extremes(values: list[float], name: str) -> tuple[float, float, int]:
    """(max, min, index of the max) of one model's logprobs, refusing NaN, +inf and positive
    values beyond float32 rounding; builtins are cheaper than numpy on a few dozen floats."""
    total = sum(values)  # NaN if any NaN, +inf if any +inf (NaN if +inf and -inf)
    if total != total or total == math.inf:
        raise SamplingError(f"{name}: NaN or +inf logprob")
    top = max(values)
    if top > POSITIVE_TOLERANCE:
        raise SamplingError(f"{name}: positive logprob {top!r}")
    return top, min(values), values.index(top)


def _log_fill(
    exps: list[float],
    lo: int,
    hi: int,
    values: list[float],
    top: float,
    at: int,
    low: float,
    missing: int,
) -> float:
    """§1: log of the value every id one model did not return gets,
    max(min(min known P, tail / |missing|), 1e-10), for the model at [lo, hi) of the lists
    (`exps` = e^logprob, `values` = logprob, max `top` at lo + at, min `low`), `missing` ids.

    τ = 1 − M as −expm1(top + log1p(Σ_{others} e^(lp − top))): no cancellation when M ≈ 1
    (1 − Σ e^lp would put an error of ulp(1)/τ into log fill, hence into d)."""
    at += lo
    e_top = exps[at]
    if e_top > _SUBNORMAL_SAFE:
        others = (sum(exps[lo:at]) + sum(exps[at + 1 : hi])) / e_top
    else:  # e^top (nearly) underflowed: the ratios straight from the logs
        rest = values[lo:at] + values[at + 1 : hi]
        others = sum([math.exp(v - top) for v in rest])
    tail = -math.expm1(top + math.log1p(others))
    share = tail / missing if tail > 0.0 else 0.0
    smallest = math.exp(low)
    if share < smallest:
        return math.log(share if share > FILL_FLOOR else FILL_FLOOR)
    # The fill is the smallest known value: its log exactly, so the tie with that id stays an
    # exact tie (broken by id, §4) instead of depending on the rounding of log(exp(low)).
    return low if smallest > FILL_FLOOR else _LOG_FILL_FLOOR


def _filled(n: int, value: float) -> FloatArray:
    out = np.empty(n)
    out.fill(value)
    return out


def _log_sum_exp(logs: FloatArray) -> float:
    top = float(np.maximum.reduce(logs))
    return top + math.log(float(_sum(np.exp(logs - top))))


def _nucleus(order_key: FloatArray, values: FloatArray, p: float) -> IntArray:
    """Indices of the fewest ids with the largest `order_key` whose cumulative `values` reach
    p·Σ values, the crossing id included; ties: lower index (= lower id) first. Unsorted."""
    order = (-order_key).argsort(kind="stable")
    cumulative = _accumulate(values[order])
    count = int(cumulative.searchsorted(p * cumulative[-1])) + 1
    return order[:count]


def _request_filter(x: FloatArray, q: FloatArray, top_k: int, top_p: float) -> IntArray | None:
    """Positions kept by the request's top_k then top_p (vLLM's order: top_p acts on the
    top_k-renormalized q); sorted, or None when nothing is dropped. Ordered by log q (x),
    which ranks like q but stays distinct where q underflows."""
    m = x.shape[0]
    if 0 < top_k < m:
        order = (-x).argsort(kind="stable")[:top_k]
        if top_p < 1.0:
            cumulative = _accumulate(q[order])
            order = order[: int(cumulative.searchsorted(top_p * cumulative[-1])) + 1]
    elif top_p < 1.0:
        order = _nucleus(x, q, top_p)
    else:
        return None
    if order.shape[0] == m:
        return None
    order.sort()
    return order
