"""One mixing step: align, temper, diagnose, trust region, α, q (ALGORITHM.md §1–5).

`mix` is the deterministic part (q and the diagnostics, no randomness); `mix_step` adds the
draw (`app.sampling.draw.sample`). A step touches a few dozen ids, where numpy's per-call
overhead (not the arithmetic) is the cost: the code counts calls, avoids axis reductions and
`max` where a bound is known, and does scalar work in Python floats (bench/sampling.py).

Numerical conventions (every output stays finite; NaN never escapes):
- vLLM's -9999 clamp is kept as the finite log-probability -9999 (see `topk.CLAMP_LOGPROB`),
  so d = log p_t − log p_b is finite everywhere.
- Temperatures below 1e-5 are greedy, as in vLLM (`_SAMPLING_EPS`); this also bounds 1/T.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from app.sampling.draw import sample
from app.sampling.solver import Point, evaluate, moments_matrix, solve
from app.sampling.topk import ModelView, read_topk
from app.sampling.types import MixConfig, Mixture, Reason, SamplingError, StepResult, TopK

FILL_FLOOR = 1e-10  # §1: the smallest value a missing id gets
IDENTICAL_TOLERANCE = 1e-12  # §5.4
GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: below it, sampling is greedy
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
_LN2 = math.log(2.0)
# ufunc methods and C-level fills: ndarray.sum / np.full / np.cumsum go through Python
# wrappers that cost more than the arithmetic on arrays this small (measured ~2x).
_sum = np.add.reduce
_accumulate = np.add.accumulate
_UNDERFLOW = 1e-150

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def validate_config(config: MixConfig) -> None:
    """Raise `SamplingError` for option values the math must not run with.

    Written as `not lo <= x <= hi` so NaN fails every check."""
    alpha = config.alpha
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise SamplingError("mixing.alpha must be in [0, 1] or null")
    rho = config.trust_region_top_p
    if rho is not None and not 0.0 < rho <= 1.0:
        raise SamplingError("mixing.trust_region_top_p must be in (0, 1] or null")
    if not 0.0 <= config.js_threshold <= math.inf:
        raise SamplingError("mixing.js_threshold must be >= 0")
    if not 0.0 <= config.overlap_threshold <= 1.0:
        raise SamplingError("mixing.overlap_threshold must be in [0, 1]")
    if not 0.0 <= config.temperature <= MAX_TEMPERATURE:
        raise SamplingError("temperature must be in [0, 2]")
    if not 0.0 < config.top_p <= 1.0:
        raise SamplingError("top_p must be in (0, 1]")
    if isinstance(config.top_k, bool) or not isinstance(config.top_k, int) or config.top_k < -1:
        raise SamplingError("top_k must be -1, 0 (off) or a positive integer")


def mix(
    base: TopK,
    teacher: TopK,
    config: MixConfig,
    *,
    first_token: bool,
    alpha_hint: float | None = None,
) -> Mixture:
    """q and the §6 diagnostics for one step, without drawing (see `Mixture`).

    Definitions of the reported values:
    - `js`, `overlap_count`, `overlap_mass`: §3, on the tempered p_b, p_t over all of S.
    - `alpha`, `reason`: §4–5; `alpha` is None exactly when `reason == "single_token"`
      (which wins over every §5 rule: the nucleus leaves nothing to mix).
    - `kl_gap` = |KL(q_α‖p_b) − KL(q_α‖p_t)| = |g(α)| at the α used, on the trust-region
      support, before the request's top_p/top_k: ≤ 1e-9 when `reason == "solved"` (except
      where float64 cannot resolve it, see `solver.solve`); for the other reasons it is the
      same quantity at the α the rule imposed; 0 for `single_token`.
    - `chernoff` = −log Σ p_b^(1−α) p_t^α at the α used, on the same support (0 for
      `single_token`); it is the Chernoff information C of §5 when `reason == "solved"`.
    - `filled_mass`: Σ of the final q over ids that at least one model did not return.
    - `logq`/`q`: after the request's top_k then top_p (vLLM's order), renormalized.
    - T = 0: §3–5 run at T = 1 and `greedy_token` = argmax q (ties: lowest id); `logq` is
      that T = 1 distribution (what OpenAI-style logprobs report for greedy decoding).
    """
    validate_config(config)
    b = read_topk(base, "base")
    t = read_topk(teacher, "teacher")

    # §1: one support S (sorted union of ids), fills for what each model did not return.
    kb, kt = b.ids.shape[0], t.ids.shape[0]
    merged = np.concatenate((b.ids, t.ids))
    merged.sort()
    if merged[0] < 0:
        raise SamplingError("negative token id in top-K logprobs")
    first = np.empty(kb + kt, dtype=bool)
    first[0] = True
    np.not_equal(merged[1:], merged[:-1], out=first[1:])
    support = merged[first]
    n = support.shape[0]
    pos_b = support.searchsorted(b.ids)
    pos_t = support.searchsorted(t.ids)
    shared = np.zeros(n)
    shared[pos_b] = 1.0
    known_t = np.zeros(n)
    known_t[pos_t] = 1.0
    shared *= known_t  # 1.0 on K_b ∩ K_t
    overlap_count = int(_sum(shared))
    if kb + kt - n != overlap_count:  # |K_b| + |K_t| − |S| counts duplicates too
        raise SamplingError("duplicate token id in top-K logprobs")
    # §2: the temperature applies to both models (T = 0: everything at T = 1, then argmax).
    temperature = config.temperature
    greedy = temperature < GREEDY_TEMPERATURE
    inverse_t = 1.0 if greedy else 1.0 / temperature
    lb, pb = _tempered(b, pos_b, n, inverse_t)
    lt, pt = _tempered(t, pos_t, n, inverse_t)

    # §3: stability diagnostics on all of S.
    js = _jensen_shannon(lb, pb, lt, pt)
    overlap_mass = min(float(pb @ shared), float(pt @ shared))
    unstable = js > config.js_threshold or overlap_mass < config.overlap_threshold

    # §4: trust region on the teacher, before α. Ids outside the nucleus stay in the arrays
    # with log p_b = -inf and d = 0 (so q = 0 there and nothing needs gathering/scattering).
    d = lt - lb
    single = False
    rho = config.trust_region_top_p
    if rho is not None and rho < 1.0:
        order = (-pt).argsort(kind="stable")  # stable: ties keep id order, lower id first
        cumulative = _accumulate(pt[order])
        count = int(cumulative.searchsorted(rho * cumulative[-1])) + 1  # crossing id included
        single = count == 1
        if count < n:
            nucleus, outside = order[:count], order[count:]
            log_mass_b = _log_mass(lb, pb, nucleus)
            lb = lb - log_mass_b
            lb[outside] = -np.inf
            d += log_mass_b - math.log(float(cumulative[count - 1]))
            d[outside] = 0.0
            if single:  # exactly q = 1 on that id: logprob 0, kl_gap 0, chernoff 0
                lb[nucleus] = 0.0
                d[nucleus] = 0.0

    # §5: α (first rule that applies), then q_α.
    moments = moments_matrix(d)
    alpha: float | None
    reason: Reason
    point: Point
    if single:
        alpha, reason = None, "single_token"
        point = evaluate(lb, moments, 1.0)
    else:
        if config.force_first_token and first_token:
            alpha, reason = 1.0, "first_token"
        elif config.alpha is not None:
            alpha, reason = float(config.alpha), "fixed"
        elif config.stability_check and unstable and config.auto_fallback:
            alpha, reason = 1.0, "unstable"
        elif float(np.maximum.reduce(moments[2])) < IDENTICAL_TOLERANCE**2:
            alpha, reason = 0.5, "identical"
        else:
            alpha, reason = None, "solved"
        if alpha is None:
            point = solve(lb, moments, alpha_hint)
            alpha = point.alpha
        else:
            point = evaluate(lb, moments, alpha)

    # q_α, then the request's top_k / top_p on it.
    log_norm = point.shift + math.log(point.z)
    q = point.w / point.z
    logq = point.x - log_norm
    keep = _request_filter(point.x, q, config.top_k, config.top_p)
    if keep is not None:
        mass = float(_sum(q[keep]))
        kept_q = q[keep] / mass
        kept_logq = logq[keep] - math.log(mass)
        q = np.zeros(q.shape[0])
        q[keep] = kept_q
        logq = _filled(q.shape[0], -np.inf)
        logq[keep] = kept_logq
    greedy_token = None
    if greedy:  # argmax returns the first maximum: the lowest id
        greedy_token = int(support[int(point.x.argmax())])
    filled_mass = 1.0 - float(q @ shared)  # q off the ids both models returned
    chernoff = -log_norm
    return Mixture(
        support=support,
        logq=logq,
        q=q,
        greedy_token=greedy_token,
        alpha=alpha,
        reason=reason,
        js=js,
        overlap_count=overlap_count,
        overlap_mass=min(overlap_mass, 1.0),
        kl_gap=abs(point.g),
        chernoff=chernoff if chernoff > 0.0 else 0.0,
        filled_mass=min(max(filled_mass, 0.0), 1.0),
    )


def mix_step(
    base: TopK,
    teacher: TopK,
    config: MixConfig,
    *,
    first_token: bool,
    rng: np.random.Generator,
    alpha_hint: float | None = None,
) -> StepResult:
    """The full step: `mix` (§1–5) then the draw from q with `rng` (§5, §7).

    `alpha_hint` is the previous step's α of this sequence (a warm start for the solver only).
    The reported `logprob` is log q(token) of the distribution actually sampled from: after
    the trust region and the request's top_p/top_k (for T = 0 see `mix`).
    """
    return sample(mix(base, teacher, config, first_token=first_token, alpha_hint=alpha_hint), rng)


def _tempered(
    view: ModelView, positions: IntArray, n: int, inverse_t: float
) -> tuple[FloatArray, FloatArray]:
    """§1 + §2 for one model: log p and p over S, normalized, missing ids filled with
    max(min(min known P, tail / |missing|), 1e-10) before the temperature."""
    missing = n - view.ids.shape[0]
    top = view.top
    if missing:
        # τ = 1 − M as −expm1(top + log1p(Σ_{others} e^(lp − top))): no cancellation when
        # M ≈ 1 (1 − Σ e^lp would put an error of ulp(1)/τ into log fill, hence into d).
        others = np.exp(view.logprobs - top)
        others[view.top_index] = 0.0
        tail = -math.expm1(top + math.log1p(float(_sum(others))))
        fill = min(math.exp(view.low), tail / missing) if tail > 0.0 else 0.0
        log_fill = math.log(fill if fill > FILL_FLOOR else FILL_FLOOR)
        logs = _filled(n, log_fill)
        top = max(top, log_fill)
    else:
        logs = np.empty(n)
    logs[positions] = view.logprobs
    # Subtract the max (a known scalar: no reduction) before exp, then normalize.
    logs -= top
    if inverse_t != 1.0:
        logs *= inverse_t
    p = np.exp(logs)
    total = float(_sum(p))  # ≥ 1: the max is exp(0)
    p /= total
    logs -= math.log(total)
    return logs, p


def _filled(n: int, value: float) -> FloatArray:
    out = np.empty(n)
    out.fill(value)
    return out


def _log_mass(logs: FloatArray, probs: FloatArray, subset: IntArray) -> float:
    """log Σ_subset p, from the probabilities unless they underflowed (e.g. the base puts
    almost no mass on the teacher's nucleus), then by log-sum-exp of the logs."""
    mass = float(_sum(probs[subset]))
    if mass > _UNDERFLOW:
        return math.log(mass)
    part = logs[subset]
    top = float(np.maximum.reduce(part))
    return top + math.log(float(_sum(np.exp(part - top))))


def _jensen_shannon(lb: FloatArray, pb: FloatArray, lt: FloatArray, pt: FloatArray) -> float:
    """½KL(p_b‖m) + ½KL(p_t‖m) = ½[Σ p_b log p_b + Σ p_t log p_t − Σ s log(s/2)], s = p_b + p_t.
    One log per id; 0·log 0 terms vanish because the logs are finite (s = 0 only when both
    underflow, where the 1e-300 keeps log finite and the term is 0)."""
    s = pb + pt
    s += 1e-300
    # Σ s log(s/2) = Σ s log s − 2 ln 2 (Σ s = 2)
    js = 0.5 * (float(pb @ lb) + float(pt @ lt) - float(s @ np.log(s))) + _LN2
    return min(max(js, 0.0), _LN2)  # rounding can step outside [0, ln 2]


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
