"""Certified support (docs/ALGORITHM.md §9): what the top-K view cannot know, bounded.

`uncertain_mass` is an upper bound on the total-variation distance between the step's q (a
`Mixture` from `mix`) and the q* that §1–5 would give with both models' full distributions
known (same options). `model_logprob` is one model's raw logprob of a token, exact when the
model returned it, else an upper bound.

What the view tells about model m (ids K_m, exact P_m = exp(logprob) there, mass M_m, tail
τ_m = max(1 − M_m, 0)): every id it did not return has a value in [0, cap_m] with
cap_m = min(min_{K_m} P_m, τ_m), and those values sum to τ_m. (With vLLM's K+1 case, where the
extra entry is a sampled token outside the top K, pass `requested_k`: the cap is then the K-th
largest value. The gateway's probes run at temperature 0, so its extra entry is an argmax tie
and the plain rule holds.)

The derivation is in docs/ALGORITHM.md §9 ("How uncertain_mass is computed and why it is a
bound"); the comments below point at its steps. Plain numpy/python on a few dozen ids; not on
the hot path of `mix` (nothing here changes q).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from app.sampling.shaping import shapes
from app.sampling.types import MixConfig, Mixture, SamplingError, TopK

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

CLAMP_LOGPROB = -9999.0  # topk.CLAMP_LOGPROB / kernel.CLAMP_LOGPROB
FILL_FLOOR = 1e-10  # kernel.FILL_FLOOR (§1)
GREEDY_TEMPERATURE = 1e-5  # kernel.GREEDY_TEMPERATURE
# Decisions the full-vocabulary run makes by comparing floats (the nucleus crossing, the JS
# threshold, the solver's |g| ≤ 1e-10) count as certain only with this much room to spare,
# so float rounding on either side cannot flip them.
MARGIN = 1e-9
# The same for decisions on sums of many upstream values (the nucleus crossing, JS against its
# threshold): vLLM computes logprobs in float32, and a full vocabulary's probabilities were
# measured summing to 1 + 8.5e-6 (bench/fidelity.py, docs/BENCHMARKS.md), so a nucleus cut
# with less room than this is not certain.
DATA_MARGIN = 1e-5
BISECTIONS = 40  # the α* bracket to ~1e-12
LN2 = math.log(2.0)


class _Uncertified(Exception):
    """A case this module does not certify: the bound is 1.0."""


class _View:
    """One model's top-K view: exact values on its ids, [0, cap] and Σ = tail elsewhere."""

    __slots__ = ("cap", "count", "ids", "log_cap", "logp", "tail")

    def __init__(self, topk: TopK, requested_k: int | None) -> None:
        ids = np.asarray(topk.ids, dtype=np.int64)
        logp = np.maximum(np.asarray(topk.logprobs, dtype=np.float64), CLAMP_LOGPROB)
        if ids.ndim != 1 or ids.shape != logp.shape or ids.shape[0] == 0:
            raise SamplingError("empty top-K or ids/logprobs of different shapes")
        if np.isnan(logp).any():
            raise SamplingError("NaN logprob")
        self.ids = ids
        self.logp = logp
        self.count = int(ids.shape[0])
        self.tail = _tail(logp)
        ordered = np.sort(logp)[::-1]
        if requested_k is not None and 0 < requested_k < self.count:
            largest_unreturned = float(ordered[requested_k - 1])  # the K-th largest
        else:
            largest_unreturned = float(ordered[-1])
        self.log_cap = min(largest_unreturned, math.log(self.tail) if self.tail > 0 else -math.inf)
        self.cap = math.exp(self.log_cap)


def _tail(logp: FloatArray) -> float:
    """τ = max(1 − Σ e^lp, 0) without cancellation when the mass is near 1 (as kernel.log_fill)."""
    top = float(logp.max())
    others = float(np.exp(logp - top).sum()) - 1.0
    return max(-math.expm1(top + math.log1p(others)), 0.0)


def model_logprob(
    topk: TopK, token_id: int, *, requested_k: int | None = None
) -> tuple[float, bool]:
    """The model's raw logprob (before temperature) of `token_id`: (value, True) when the model
    returned the id, else (log of the largest value it can have, False), an upper bound:
    log min(min_K P, τ) (with `requested_k`, the K-th largest value instead of min_K P, for
    vLLM's K+1 case). Floored at vLLM's -9999 (the bound of an id that must have probability
    ~0), so it is always a finite float."""
    view = _View(topk, requested_k)
    where = np.flatnonzero(view.ids == token_id)
    if where.shape[0]:
        return float(view.logp[where[0]]), True
    return max(view.log_cap, CLAMP_LOGPROB), False


def uncertain_mass(
    base: TopK,
    teacher: TopK,
    mixture: Mixture,
    config: MixConfig,
    *,
    vocab_size: int | None = None,
    requested_k: int | None = None,
) -> float:
    """An upper bound in [0, 1] on TV(q, q*): q = `mixture.q` (over `mixture.support`, from
    `mix(base, teacher, config, ...)`), q* = the §1–5 mixture of the two full distributions
    with the same options (docs/ALGORITHM.md §9).

    `vocab_size` (the number of ids either model can give) tightens some bounds and is needed
    for temperatures above 1; `requested_k` is the K asked for (see the module docstring).
    T = 0: the bound is on the T = 1 distribution `mixture.logq` reports, not on the argmax.

    1.0 (no certificate) when: the request sets a §5a transform (min_p, penalties,
    logit_bias) or a top_p < 1, or a top_k that may cut q or q*; T > 1 without `vocab_size`;
    the trust region is on and the full run's nucleus is not determined by the known teacher
    values (M_t below ρ, ties with the cap, renormalization that can move the crossing); our
    step is `single_token` while the full nucleus is not certainly one id. With min_tokens
    (held-back ids), the bound assumes the §5a fallback (a nucleus of held ids only) did not
    widen either run.
    """
    try:
        value = _Certifier(base, teacher, mixture, config, vocab_size, requested_k).bound()
    except _Uncertified:
        return 1.0
    if not math.isfinite(value):
        return 1.0
    return min(max(value, 0.0), 1.0)


def _power_sum_slots(total: float, largest: float, count: int | None, s: float) -> list[float]:
    """Upper bounds on Σ z^s over at most `count` values z ∈ [0, largest] with Σ z ≤ total
    (count None: unknown), one per argument, in fixed slots (inf where one does not apply):
    s = 1: Σz; s > 1: (Σz)^s ≥ Σz^s, and Σz^s ≤ max z^(s−1)·Σz; s < 1: the power mean,
    Σz^s ≤ n^(1−s)(Σz)^s; any s: n·(max z)^s.

    Each slot, with total and largest Hölder products of β-powers, is log-convex in β, so its
    sup over an interval of β is at an end: callers take each slot's max over the ends, then
    the min over slots (`_sup_min`)."""
    if total <= 0.0 or largest <= 0.0:
        return [0.0] * 4
    inf = math.inf
    return [
        total if s == 1.0 else inf,
        min(total**s, largest ** (s - 1.0) * total) if s > 1.0 else inf,
        count ** (1.0 - s) * total**s if s < 1.0 and count is not None else inf,
        count * largest**s if count is not None else inf,
    ]


def _power_sum_bound(total: float, largest: float, count: int | None, s: float) -> float:
    return min(_power_sum_slots(total, largest, count, s))


def _sup_min(slots_per_end: list[list[float]]) -> float:
    """min over slots of (max over the ends): a bound on the sup over the interval of the
    smallest slot, valid because each slot is convex in β."""
    return float(min(max(column) for column in zip(*slots_per_end, strict=True)))


def _tail_power_bounds(view: _View, s: float, count: int | None) -> tuple[float, float]:
    """Bounds on Σ P^s over the ids `view`'s model did not return (`count` of them, or None):
    Σ P = τ, each P ≤ cap. s < 1: Σ P^s ≥ Σ P·cap^(s−1); s > 1: Σ P^s ≥ n(τ/n)^s (Jensen)."""
    tau = view.tail
    if tau <= 0.0 or count == 0:  # (a view of every id: τ is rounding)
        return 0.0, 0.0
    if s == 1.0:
        return tau, tau
    high = _power_sum_bound(tau, view.cap, count, s)
    if s < 1.0:
        low = tau * math.exp((s - 1.0) * view.log_cap) if view.cap > 0 else math.inf
    else:
        low = count * (tau / count) ** s if count else 0.0
    if low > high * (1.0 + MARGIN):  # the view contradicts its own premise
        raise _Uncertified
    return min(low, high), high


def _log_fill(logp: FloatArray, missing: int) -> float:
    """kernel.log_fill in numpy: the §1 fill of one model's missing ids (log)."""
    top = float(logp.max())
    others = float(np.exp(logp - top).sum()) - 1.0
    tail = -math.expm1(top + math.log1p(others))
    share = tail / missing if tail > 0.0 else 0.0
    low = float(logp.min())
    if share < math.exp(low):
        return math.log(max(share, FILL_FLOOR))
    return low if math.exp(low) > FILL_FLOOR else math.log(FILL_FLOOR)


def _interval_ratio(e_lo: float, e_hi: float, w_lo: float, w_hi: float) -> tuple[float, float]:
    """The range of E/W over E ∈ [e_lo, e_hi], W ∈ [w_lo, w_hi], w_lo > 0."""
    low = e_lo / w_lo if e_lo < 0 else e_lo / w_hi
    high = e_hi / w_lo if e_hi > 0 else e_hi / w_hi
    return low, high


def _f(a: float, b: float) -> float:
    """One id's JS term ½[a log(2a/(a+b)) + b log(2b/(a+b))] (0 log 0 = 0)."""
    total = a + b
    if total <= 0.0:
        return 0.0
    value = 0.0
    if a > 0:
        value += a * math.log(2.0 * a / total)
    if b > 0:
        value += b * math.log(2.0 * b / total)
    return 0.5 * value


class _Certifier:
    """The bound for one step; see docs/ALGORITHM.md §9 for the steps named below."""

    def __init__(
        self,
        base: TopK,
        teacher: TopK,
        mixture: Mixture,
        config: MixConfig,
        vocab_size: int | None,
        requested_k: int | None,
    ) -> None:
        self.config = config
        self.mixture = mixture
        temperature = config.temperature
        self.s = 1.0 if temperature < GREEDY_TEMPERATURE else 1.0 / temperature
        self.vocab = vocab_size
        if shapes(config) or config.top_p < 1.0:
            raise _Uncertified  # §5a transforms and top_p: not certified
        if self.s < 1.0 and vocab_size is None:
            raise _Uncertified  # T > 1: Σ P^(1/T) over unknown ids needs their count
        self.b = _View(base, requested_k)
        self.t = _View(teacher, requested_k)
        support = np.asarray(mixture.support, dtype=np.int64)
        self.support = support
        if support.shape[0] != np.union1d(self.b.ids, self.t.ids).shape[0]:
            raise SamplingError("the mixture's support is not the union of the two top-K ids")
        n = int(support.shape[0])
        if vocab_size is not None and vocab_size < n:
            raise SamplingError("vocab_size is smaller than the support")
        self.n = n
        # Known raw logprobs aligned on S (nan where the model did not return the id).
        self.lpb = np.full(n, math.nan)
        self.lpt = np.full(n, math.nan)
        self.lpb[np.searchsorted(support, self.b.ids)] = self.b.logp
        self.lpt[np.searchsorted(support, self.t.ids)] = self.t.logp
        self.in_b: BoolArray = ~np.isnan(self.lpb)
        self.in_t: BoolArray = ~np.isnan(self.lpt)
        self.both: BoolArray = self.in_b & self.in_t
        self.logq = np.asarray(mixture.logq, dtype=np.float64)
        self.q = np.asarray(mixture.q, dtype=np.float64)
        self.alive: BoolArray = np.isfinite(self.logq)  # our N (after everything)
        # Σ P_m^s over the ids model m did not return.
        self.tail_b = _tail_power_bounds(self.b, self.s, self._unreturned(self.b))
        self.tail_t = _tail_power_bounds(self.t, self.s, self._unreturned(self.t))
        self.outside = None if vocab_size is None else vocab_size - n  # |V \ S|
        self.nucleus = self._full_nucleus()  # None: no trust region (N* = V)
        self.in_nucleus: BoolArray = np.ones(n, np.bool_) if self.nucleus is None else self.nucleus

    def _unreturned(self, view: _View) -> int | None:
        return None if self.vocab is None else self.vocab - view.count

    # --- the full run's nucleus (§4) ------------------------------------------------------

    def _full_nucleus(self) -> BoolArray | None:
        """N* as a mask over S, when the known teacher values determine it; else uncertified.

        N* is a prefix of the known teacher ids by P_t (ties: lower id) when its crossing lies
        inside K_t for every normalizer Z_t the tail allows, and every id of N* is strictly
        above the cap of the ids the teacher did not return."""
        rho = self.config.trust_region_top_p
        if rho is None or rho >= 1.0:
            return None
        t = self.t
        order = np.lexsort((t.ids, -t.logp))  # by −P_t, then id
        values = np.exp(self.s * t.logp[order])
        cumulative = np.cumsum(values)
        z_lo = float(cumulative[-1]) + self.tail_t[0]
        z_hi = float(cumulative[-1]) + self.tail_t[1]
        reached = np.flatnonzero(cumulative >= rho * z_hi * (1.0 + DATA_MARGIN))
        if reached.shape[0] == 0:
            raise _Uncertified  # the nucleus may reach into ids the teacher did not return
        count = int(reached[0]) + 1
        if count > 1 and cumulative[count - 2] >= rho * z_lo * (1.0 - DATA_MARGIN):
            raise _Uncertified  # the crossing moves with the unknown normalizer
        unreturned = self.vocab is None or t.count < self.vocab
        if unreturned and not t.logp[order[count - 1]] > t.log_cap + MARGIN:
            # An unreturned id can tie with the last nucleus id (τ is a rounded 1 − M: a tie
            # in exact arithmetic may look like a strict inequality, hence the margin).
            raise _Uncertified
        mask = np.zeros(self.n, np.bool_)
        mask[np.searchsorted(self.support, t.ids[order[:count]])] = True
        return mask

    # --- the bound ------------------------------------------------------------------------

    def bound(self) -> float:
        mixture = self.mixture
        if self.nucleus is not None and int(self.nucleus.sum()) == 1:
            # q* is the one id of N* (whatever α and top_k): TV(q, δ) = 1 − q(y*), exactly.
            return 1.0 - float(self.q[self.nucleus].sum())
        if self._request_top_k_cuts():
            raise _Uncertified
        if mixture.reason == "single_token" or mixture.alpha is None:
            raise _Uncertified  # ours is one id, the full run's nucleus is not
        alpha = float(mixture.alpha)
        return max(self._component(lo, hi, alpha) for lo, hi in self._full_alphas())

    def _request_top_k_cuts(self) -> bool:
        """Whether the request's top_k can change q or q* (then: uncertified)."""
        top_k = self.config.top_k
        if top_k <= 0:
            return False
        if self.vocab is not None and top_k >= self.vocab:
            return False
        # Ours: a top_k that cut leaves exactly top_k ids, so more alive ids means no cut.
        ours_uncut = top_k > int(self.alive.sum())
        full_uncut = self.nucleus is not None and top_k >= int(self.nucleus.sum())
        return not (ours_uncut and full_uncut)

    # --- which α the full run can use (§5 rules) ------------------------------------------

    def _full_alphas(self) -> list[tuple[float, float]]:
        """The α the full run may use (§5 rules on the full vocabulary), as closed intervals.

        Rules 1 and 2 do not depend on the data: ours fired rule 1 exactly when the full run
        does (single_token aside, handled before). Rules 3–5 do: the full run's JS and d*
        are bounded here, and every outcome that is not excluded is kept."""
        config = self.config
        if config.force_first_token and self.mixture.reason == "first_token":
            return [(1.0, 1.0)]
        if config.alpha is not None:
            return [(config.alpha, config.alpha)]
        unstable, stable = False, True
        if config.stability_check and config.auto_fallback:
            unstable, stable = self._stability()
        components: list[tuple[float, float]] = []
        if unstable:
            components.append((1.0, 1.0))
        if stable:
            if self._identical_possible():
                components.append((0.5, 0.5))
            components.append(self._alpha_range())
        return components

    def _z_bounds(self, view: _View, lp: FloatArray, known: BoolArray) -> tuple[float, float]:
        """Σ_V P^s for one model: the known part plus the tail's bounds."""
        tail = self.tail_b if view is self.b else self.tail_t
        known_sum = float(np.exp(self.s * lp[known]).sum())
        return known_sum + tail[0], known_sum + tail[1]

    def _stability(self) -> tuple[bool, bool]:
        """(the full run may be unstable, it may be stable) under §3 on the full vocabulary:
        there every id is shared, so overlap_mass = 1, and JS is bounded by its known terms
        plus ln2/2 per unit of mass that rests on unknown values (½·f(a, b) ≤ ln2·(a + b)/2)."""
        config = self.config
        zb = self._z_bounds(self.b, self.lpb, self.in_b)
        zt = self._z_bounds(self.t, self.lpt, self.in_t)
        js_lo = js_hi = 0.0
        known_b = known_t = 0.0
        for j in np.flatnonzero(self.both):
            ub = math.exp(self.s * self.lpb[j])
            ut = math.exp(self.s * self.lpt[j])
            corners = [_f(ub / x, ut / y) for x in zb for y in zt]
            js_hi += max(corners)  # f is jointly convex: its max on a box is at a corner
            if zb[0] == zb[1] and zt[0] == zt[1]:
                js_lo += corners[0]
            known_b += ub / zb[1]
            known_t += ut / zt[1]
        js_hi += 0.5 * LN2 * (max(1.0 - known_b, 0.0) + max(1.0 - known_t, 0.0))
        overlap_may_fail = config.overlap_threshold > 1.0 - MARGIN
        unstable = overlap_may_fail or js_hi > config.js_threshold - DATA_MARGIN
        stable = js_lo <= config.js_threshold + DATA_MARGIN
        return unstable, stable

    def _identical_possible(self) -> bool:
        """§5 rule 4 needs d* = 0 on all of N*: impossible once two known ids differ."""
        known = self.both & self.in_nucleus
        if int(known.sum()) < 2:
            return True
        d = self.lpt[known] - self.lpb[known]
        return float(d.max() - d.min()) * self.s <= MARGIN

    # --- the solved α* (§5 rule 5) --------------------------------------------------------

    def _alpha_range(self) -> tuple[float, float]:
        """[lo, hi] holding the full run's α (its root of g, to the solver's tolerance).

        g*(β) = E/W + c with E = Σ_{N*} w_β·(u_t − u_b), W = Σ_{N*} w_β, u = s·log P,
        w_β = e^((1−β)u_b + βu_t), c = log Z_b − log Z_t (the two normalizers on N*). g* is
        increasing (g′ = Var ≥ 0); wherever its bounds say g* < −margin the root lies above
        (the solver's α, with |g| ≤ 1e-10, too), wherever g* > margin it lies below."""
        region = self.in_nucleus
        known = self.both & region
        s = self.s
        self._ub = s * self.lpb[known]
        self._ut = s * self.lpt[known]
        self._lt_partial = self.lpt[region & self.in_t & ~self.in_b]
        self._lb_partial = self.lpb[self.in_b & ~self.in_t] if self.nucleus is None else None
        zb, zt = self._nucleus_normalizers()
        if min(zb[0], zt[0]) <= 0.0:
            return 0.0, 1.0
        self._c = (math.log(zb[0]) - math.log(zt[1]), math.log(zb[1]) - math.log(zt[0]))
        lo, up = 0.0, 1.0
        for _ in range(BISECTIONS):
            mid = 0.5 * (lo + up)
            if self._g_bounds(mid)[1] < -MARGIN:
                lo = mid
            else:
                up = mid
        down, hi = lo, 1.0
        for _ in range(BISECTIONS):
            mid = 0.5 * (down + hi)
            if self._g_bounds(mid)[0] > MARGIN:
                hi = mid
            else:
                down = mid
        return lo, hi

    def _g_bounds(self, beta: float) -> tuple[float, float]:
        """Bounds on g*(β) for β in (0, 1), from the arrays `_alpha_range` prepared."""
        s = self.s
        a, b = (1.0 - beta) * s, beta * s
        ub, ut = self._ub, self._ut
        w = np.exp((1.0 - beta) * ub + beta * ut)
        e_known = float(w @ (ut - ub))
        w_known = float(w.sum())
        if not w_known > 0.0:
            return -math.inf, math.inf
        e_lo = e_hi = e_known
        w_hi = w_known
        with np.errstate(over="ignore", invalid="ignore"):
            # Teacher known (y), base unknown (x ∈ (0, cap_b]): with ℓ = log(y/x) ≥ ℓ_min the
            # term is y^s·sℓe^(−aℓ): at most y^s/((1−β)e) (at ℓ = 1/a), at least
            # min(0, its value at ℓ_min); x = 0 (cap 0) gives weight 0.
            log_cap_b = self.b.log_cap
            lt = self._lt_partial
            if lt.shape[0] and log_cap_b > -math.inf:
                ell = lt - log_cap_b
                at_min = s * ell * np.exp(s * lt - a * ell)
                peak = np.exp(s * lt) / ((1.0 - beta) * math.e)
                e_hi += float(np.where(ell <= 1.0 / a, peak, at_min).sum())
                e_lo += float(np.minimum(at_min, 0.0).sum())
                w_hi += float(np.exp(s * (beta * lt + (1.0 - beta) * log_cap_b)).sum())
            lb = self._lb_partial
            if lb is not None:  # no trust region: every id of V counts
                # Base known (x), teacher unknown (y ∈ (0, cap_t]): ℓ = log(y/x) ≤ ℓ_max, the
                # term is x^s·sℓe^(bℓ): at least −x^s/(βe), at most max(0, its value at ℓ_max).
                log_cap_t = self.t.log_cap
                if lb.shape[0] and log_cap_t > -math.inf:
                    ell = log_cap_t - lb
                    at_max = s * ell * np.exp(s * lb + b * ell)
                    trough = -np.exp(s * lb) / (beta * math.e)
                    e_hi += float(np.maximum(at_max, 0.0).sum())
                    e_lo += float(np.where(ell >= -1.0 / b, trough, at_max).sum())
                    w_hi += float(np.exp(s * ((1.0 - beta) * lb + beta * log_cap_t)).sum())
                # Both unknown (V \ S): the term lies in [−x^s/(βe), y^s/((1−β)e)].
                e_hi += self.tail_t[1] / ((1.0 - beta) * math.e)
                e_lo -= self.tail_b[1] / (beta * math.e)
                w_hi += self._unknown_weight((beta,))
        if not (math.isfinite(e_lo) and math.isfinite(e_hi) and math.isfinite(w_hi)):
            return -math.inf, math.inf
        ratio_lo, ratio_hi = _interval_ratio(e_lo, e_hi, w_known, w_hi)
        return ratio_lo + self._c[0], ratio_hi + self._c[1]

    def _nucleus_normalizers(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Bounds on Σ_{N*} P_b^s and Σ_{N*} P_t^s (N* = V without a trust region)."""
        if self.nucleus is None:
            return (
                self._z_bounds(self.b, self.lpb, self.in_b),
                self._z_bounds(self.t, self.lpt, self.in_t),
            )
        region = self.nucleus  # ⊂ K_t
        zt = float(np.exp(self.s * self.lpt[region]).sum())
        kb = region & self.in_b
        zb = float(np.exp(self.s * self.lpb[kb]).sum())
        missing = int((region & ~self.in_b).sum())
        extra = min(_power_sum_bound(self.b.tail, self.b.cap, missing, self.s), self.tail_b[1])
        return (zb, zb + extra), (zt, zt)

    # --- unknown weight (Hölder) ----------------------------------------------------------

    def _unknown_weight(self, ends: tuple[float, ...]) -> float:
        """An upper bound, over β between the `ends`, on Σ_{V\\S} (P_b^(1−β)·P_t^β)^s:
        Hölder gives Σ P_b^(1−β)P_t^β ≤ τ_b^(1−β)τ_t^β, each term is at most
        cap_b^(1−β)cap_t^β, and `_power_sum_slots` turns that into a bound on the s-th powers."""
        slots = []
        for beta in ends:
            total = self.b.tail ** (1.0 - beta) * self.t.tail**beta
            largest = self.b.cap ** (1.0 - beta) * self.t.cap**beta
            slots.append(_power_sum_slots(total, largest, self.outside, self.s))
        return _sup_min(slots)

    def _partial_weight(self, ends: tuple[float, ...], partial: BoolArray) -> float:
        """An upper bound, over β between the `ends`, on Σ w_β over the ids of `partial` (ids of
        S) whose w_β needs a value the view does not have: per id with the cap, or by Hölder
        over the group (Σ P_t^β x^(1−β) ≤ (Σ P_t)^β τ_b^(1−β) for the base-unknown ones, the
        mirror image for the teacher-unknown ones)."""
        total = 0.0
        groups = (
            (partial & ~self.in_b, self.lpt, self.b, True),  # base unknown, teacher known
            (partial & ~self.in_t, self.lpb, self.t, False),  # teacher unknown, base known
        )
        for mask, known_lp, view, teacher_known in groups:
            count = int(mask.sum())
            if count == 0:
                continue
            known = np.exp(known_lp[mask])
            known_sum = float(known.sum())
            slots = []
            for beta in ends:
                power = beta if teacher_known else 1.0 - beta  # of the known value
                z_max = known**power * view.cap ** (1.0 - power)
                per_id = float((z_max**self.s).sum())
                holder = known_sum**power * view.tail ** (1.0 - power)
                slots.append([per_id, *_power_sum_slots(holder, float(z_max.max()), count, self.s)])
            total += _sup_min(slots)
        return total

    # --- one component of the α set -------------------------------------------------------

    def _component(self, lo: float, hi: float, alpha: float) -> float:
        """sup over β ∈ [lo, hi] of TV(q_α, q_β) + max(q_β(A'ᶜ), q*_β(A'ᶜ)), where q_β is our
        family at β (on our support) and A' the ids where both runs' weights are exact."""
        if lo == hi == 1.0:
            exact = self.in_t  # w_1 = P_t^s: the base is not needed
        elif lo == hi == 0.0:
            exact = self.in_b
        else:
            exact = self.both
        agree = exact & self.alive & self.in_nucleus  # A'
        alive = self.alive
        d = self._our_d()[alive]
        logq = self.logq[alive]
        ends = [logq + (beta - alpha) * d for beta in (lo, hi)]
        # TV(q_α, q_β) is monotone in |β − α| on each side of α (q_β is an exponential family
        # in β, ordered by likelihood ratio): its sup over [lo, hi] is at an end.
        q = self.q[alive]
        tv = 0.0
        for x in ends:
            family = np.exp(x - x.max())
            family /= family.sum()
            tv = max(tv, 0.5 * float(np.abs(family - q).sum()))
        # Ours off A': X/(X + Y), X = Σ_{N \ A'} w̃_β (convex in β: sup at an end),
        # Y = Σ_{A'} w̃_β (each term monotone in β: its min over the ends).
        shift = max(float(x.max()) for x in ends)
        weights = [np.exp(x - shift) for x in ends]
        inside = agree[alive]
        x_sup = max(float(w[~inside].sum()) for w in weights)
        y_inf = float(np.minimum(weights[0], weights[1])[inside].sum())
        ours = 1.0 if x_sup + y_inf <= 0.0 else x_sup / (x_sup + y_inf)
        # Full off A': U/(U + W) with U ≥ Σ_{N* \ A'} w_β and W = Σ_{A'} w_β.
        w_inf = float(
            np.minimum(self._exact_weight(lo, agree), self._exact_weight(hi, agree)).sum()
        )
        u_sup = self._outside_weight((lo, hi), exact, agree)
        full = 1.0 if u_sup + w_inf <= 0.0 else u_sup / (u_sup + w_inf)
        return tv + max(ours, full)

    def _exact_weight(self, beta: float, mask: BoolArray) -> FloatArray:
        """w_β = (P_b^(1−β)·P_t^β)^s on `mask` (ids whose needed values are known at β)."""
        s = self.s
        if beta == 1.0:
            return np.exp(s * self.lpt[mask])
        if beta == 0.0:
            return np.exp(s * self.lpb[mask])
        return np.exp(s * ((1.0 - beta) * self.lpb[mask] + beta * self.lpt[mask]))

    def _outside_weight(self, ends: tuple[float, ...], exact: BoolArray, agree: BoolArray) -> float:
        """An upper bound, over β between the `ends`, on Σ_{N* \\ A'} w_β: the exact weights of
        known ids of N* our run does not have (a sum of exponentials of β, convex: its sup is
        at an end), the partial ids' bounds, and (no trust region) the ids outside S."""
        region = self.in_nucleus
        dropped = region & exact & ~agree
        total = 0.0
        if dropped.any():
            total = max(float(self._exact_weight(beta, dropped).sum()) for beta in ends)
        partial = region & ~exact
        if partial.any():
            total += self._partial_weight(ends, partial)
        if self.nucleus is None:
            total += self._unknown_weight(ends)
        return total

    def _our_d(self) -> FloatArray:
        """d̃ = s·(log p̃_t − log p̃_b) on S with the §1 fills, up to a constant: our family at
        β is q_β ∝ q_α·e^((β−α)d̃)."""
        n = self.n
        rows = []
        for lp, known, view in ((self.lpb, self.in_b, self.b), (self.lpt, self.in_t, self.t)):
            row = np.where(known, lp, 0.0)
            if view.count < n:
                row[~known] = _log_fill(view.logp, n - view.count)
            rows.append(row)
        return self.s * (rows[1] - rows[0])
