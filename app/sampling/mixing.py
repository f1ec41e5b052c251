"""One mixing step: align, temper, diagnose, trust region, α, q (ALGORITHM.md §1–5).

`mix` is the deterministic part (q and the diagnostics, no randomness); `mix_step` adds the
draw (`app.sampling.draw.sample`). Everything runs on Python floats: a step touches a few dozen
ids, where numpy's per-call overhead costs more than the arithmetic (bench/sampling.py).

Numerical conventions (all documented outputs stay finite; NaN never escapes):
- vLLM's -9999 clamp is kept as the finite log-probability -9999 (see `topk.CLAMP_LOGPROB`),
  so d = log p_t − log p_b is finite everywhere.
- Temperatures below 1e-5 are greedy, as in vLLM (`_SAMPLING_EPS`); this also bounds 1/T.
"""

from __future__ import annotations

import math
from itertools import compress
from operator import add, mul

import numpy as np

from app.sampling.draw import sample
from app.sampling.solver import Point, evaluate, solve
from app.sampling.topk import read_topk
from app.sampling.types import MixConfig, Mixture, Reason, SamplingError, StepResult, TopK

FILL_FLOOR = 1e-10  # §1: the smallest value a missing id gets
IDENTICAL_TOLERANCE = 1e-12  # §5.4
GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: below it, sampling is greedy
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]

_exp = math.exp
_log = math.log
_NEG_INF = -math.inf


def validate_config(config: MixConfig) -> None:
    """Raise `SamplingError` for option values the math must not run with.

    Written as `not (lo <= x <= hi)` so NaN fails every check."""
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
    if not isinstance(config.top_k, int) or config.top_k < -1:
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
    - `alpha`, `reason`: §4–5 (`alpha` is None exactly when `reason == "single_token"`).
    - `kl_gap` = |KL(q_α‖p_b) − KL(q_α‖p_t)| = |g(α)| at the α used, on the trust-region
      support, before the request's top_p/top_k: ≤ 1e-9 when `reason == "solved"` (except
      where float64 cannot resolve it, see `solver.solve`), whatever it is for the other
      reasons, 0 for `single_token`.
    - `chernoff` = −log Σ p_b^(1−α) p_t^α at the α used, on the same support (0 for
      `single_token`); equals C of §5 when `reason == "solved"`.
    - `filled_mass`: Σ of the final q over ids that at least one model did not return.
    - `logq`/`draw_*`: after the request's top_k then top_p (vLLM's order), renormalized.
    - T = 0: §3–5 run at T = 1 and `greedy_token` = argmax q (ties: lowest id); `logq` is
      that T = 1 distribution (what OpenAI-style logprobs report for greedy decoding).
    """
    validate_config(config)
    ids_b, raw_b = read_topk(base, "base")
    ids_t, raw_t = read_topk(teacher, "teacher")
    known_b = dict(zip(ids_b, raw_b, strict=True))
    known_t = dict(zip(ids_t, raw_t, strict=True))
    if len(known_b) != len(ids_b) or len(known_t) != len(ids_t):
        raise SamplingError("duplicate token id in top-K logprobs")

    # §1: one support, fills for what each model did not return.
    support = sorted(known_b.keys() | known_t.keys())
    n = len(support)
    log_b = _aligned(known_b, raw_b, support)
    log_t = _aligned(known_t, raw_t, support)
    shared = [y in known_b and y in known_t for y in support]
    overlap_count = sum(shared)

    # §2: temperature on both models (T = 0: everything at T = 1, then argmax).
    temperature = config.temperature
    greedy = temperature < GREEDY_TEMPERATURE
    if not greedy and temperature != 1.0:
        inverse = 1.0 / temperature
        log_b = [v * inverse for v in log_b]
        log_t = [v * inverse for v in log_t]
    lb, pb = _normalize(log_b)
    lt, pt = _normalize(log_t)

    # §3: stability diagnostics on all of S.
    js = _jensen_shannon(lb, pb, lt, pt)
    overlap_mass = min(sum(compress(pb, shared)), sum(compress(pt, shared)))
    unstable = js > config.js_threshold or overlap_mass < config.overlap_threshold

    # §4: trust region, before α.
    active = list(range(n))
    rho = config.trust_region_top_p
    if rho is not None and rho < 1.0:
        nucleus = _nucleus(pt, active, rho)
        if len(nucleus) < n:
            active = sorted(nucleus)
            lb = _renormalized([lb[i] for i in active])
            lt = _renormalized([lt[i] for i in active])

    # §5: α (first rule that applies), then q_α.
    d = [t - b for b, t in zip(lb, lt, strict=True)]
    alpha: float | None
    reason: Reason
    point: Point
    if len(active) == 1:
        alpha, reason = None, "single_token"
        point = evaluate(lb, d, [0.0], 1.0)
    else:
        if config.force_first_token and first_token:
            alpha, reason = 1.0, "first_token"
        elif config.alpha is not None:
            alpha, reason = config.alpha, "fixed"
        elif config.stability_check and unstable and config.auto_fallback:
            alpha, reason = 1.0, "unstable"
        elif max(map(abs, d)) < IDENTICAL_TOLERANCE:
            alpha, reason = 0.5, "identical"
        else:
            alpha, reason = None, "solved"
        if alpha is None:
            point = solve(lb, d, alpha_hint)
            alpha = point.alpha
        else:
            point = evaluate(lb, d, [e * e for e in d], alpha)

    # q_α, then the request's top_k / top_p on it.
    x = point.x
    log_norm = point.shift + _log(point.z)
    inverse_z = 1.0 / point.z
    probs = [w * inverse_z for w in point.w]
    logq = [v - log_norm for v in x]
    keep = _request_filter(x, probs, config.top_k, config.top_p)
    if keep is not None:
        mass = math.fsum(probs[i] for i in keep)
        log_mass = _log(mass)
        inverse_mass = 1.0 / mass
        probs = [probs[i] * inverse_mass for i in keep]
        logq = [logq[i] - log_mass for i in keep]
        x = [x[i] for i in keep]
        active = [active[i] for i in keep]

    draw_ids = tuple(support[i] for i in active)
    full_logq = [_NEG_INF] * n
    for i, v in zip(active, logq, strict=True):
        full_logq[i] = v
    filled_mass = math.fsum(p for p, i in zip(probs, active, strict=True) if not shared[i])
    greedy_token = draw_ids[x.index(max(x))] if greedy else None  # first max: lowest id
    chernoff = -log_norm  # −log Σ p_b^(1−α) p_t^α = −(shift + log z)
    return Mixture(
        support=np.array(support, dtype=np.int64),
        logq=np.array(full_logq, dtype=np.float64),
        draw_ids=draw_ids,
        draw_probs=tuple(probs),
        draw_logq=tuple(logq),
        greedy_token=greedy_token,
        alpha=alpha,
        reason=reason,
        js=js,
        overlap_count=overlap_count,
        overlap_mass=min(overlap_mass, 1.0),
        kl_gap=abs(point.g),
        chernoff=chernoff if chernoff > 0.0 else 0.0,
        filled_mass=min(filled_mass, 1.0),
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
    """The full step: `mix` (§1–5) then the draw from q with `rng` (§7).

    `alpha_hint` is the previous step's α of this sequence (warm start of the solver only:
    the result does not depend on it beyond the solver tolerance). The reported `logprob` is
    log q(token) of the distribution actually sampled from: after the trust region and the
    request's top_p/top_k (for T = 0 see `mix`).
    """
    return sample(mix(base, teacher, config, first_token=first_token, alpha_hint=alpha_hint), rng)


def _aligned(known: dict[int, float], logprobs: list[float], support: list[int]) -> list[float]:
    """§1: the raw log-probabilities of one model over S, missing ids filled with
    max(min(min known P, tail / |missing|), 1e-10)."""
    missing = len(support) - len(known)
    if missing == 0:
        return [known[y] for y in support]
    probs = [_exp(v) for v in logprobs]
    tail = 1.0 - math.fsum(probs)  # fsum: exact, so the fill does not depend on input order
    fill = min(min(probs), tail / missing) if tail > 0.0 else 0.0
    log_fill = _log(fill if fill > FILL_FLOOR else FILL_FLOOR)
    get = known.get
    return [get(y, log_fill) for y in support]


def _normalize(raw: list[float]) -> tuple[list[float], list[float]]:
    """Log-probabilities and probabilities of `raw` renormalized (log-sum-exp, max first)."""
    top = max(raw)
    e = [_exp(v - top) for v in raw]
    total = sum(e)
    inverse = 1.0 / total
    log_total = top + _log(total)
    return [v - log_total for v in raw], [v * inverse for v in e]


def _renormalized(logs: list[float]) -> list[float]:
    top = max(logs)
    log_total = top + _log(sum([_exp(v - top) for v in logs]))
    return [v - log_total for v in logs]


def _jensen_shannon(lb: list[float], pb: list[float], lt: list[float], pt: list[float]) -> float:
    """½KL(p_b‖m) + ½KL(p_t‖m) = ½[Σ p_b log p_b + Σ p_t log p_t − Σ s log(s/2)], s = p_b + p_t
    (one log per id; 0·log 0 terms vanish because the logs are finite)."""
    s: list[float] = list(map(add, pb, pt))
    cross = sum([v * _log(0.5 * v) for v in s if v > 0.0])
    js: float = 0.5 * (sum(map(mul, pb, lb)) + sum(map(mul, pt, lt)) - cross)
    return min(max(js, 0.0), math.log(2.0))  # rounding can step outside [0, ln 2]


def _nucleus(values: list[float], candidates: list[int], p: float) -> list[int]:
    """The fewest candidates with the largest values whose cumulative value reaches p·Σ,
    the crossing one included; ties: lower index (= lower id) first. Unsorted result."""
    # A stable sort in reverse keeps equal values in their (id) order.
    order = sorted(candidates, key=values.__getitem__, reverse=True)
    threshold = p * sum([values[i] for i in candidates])
    cumulative = 0.0
    for count, i in enumerate(order, 1):
        cumulative += values[i]
        if cumulative >= threshold:
            return order[:count]
    return order


def _request_filter(
    x: list[float], probs: list[float], top_k: int, top_p: float
) -> list[int] | None:
    """Positions kept by the request's top_k then top_p (vLLM's order: top_p acts on the
    top_k-renormalized q), sorted; None when nothing is dropped."""
    m = len(x)
    if top_k > 0 and top_k < m:
        candidates = sorted(range(m), key=x.__getitem__, reverse=True)[:top_k]
    elif top_p < 1.0:
        candidates = list(range(m))
    else:
        return None
    if top_p < 1.0:
        candidates = _nucleus(probs, candidates, top_p)
    if len(candidates) == m:
        return None
    return sorted(candidates)
