"""The solver property of §5.5 over thousands of seeded random and adversarial steps, α against
a slow reference bisection, and "NaN never escapes" on arbitrary input (hypothesis)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.sampling import MixConfig, SamplingError, TopK, mix
from tests.sampling import reference
from tests.sampling.cases import KINDS, adversarial_pair, as_mapping

TEMPERATURES = (0.05, 0.1, 0.3, 0.7, 1.0, 1.0, 1.5, 2.0)


def _topk(view: dict[int, float]) -> TopK:
    return TopK(ids=np.array(list(view), dtype=np.int64), logprobs=np.array(list(view.values())))


def test_solved_steps_equalize_the_two_kls_and_match_reference_bisection() -> None:
    rng = np.random.default_rng(20240611)
    reasons: Counter[str] = Counter()
    float_limited = 0
    compared = 0
    worst_alpha_error = 0.0
    cases = 3000
    for i in range(cases):
        kind = KINDS[i % len(KINDS)]
        base_view, teacher_view = adversarial_pair(rng, kind)
        base, teacher = as_mapping(base_view), as_mapping(teacher_view)
        temperature = TEMPERATURES[int(rng.integers(len(TEMPERATURES)))]
        rho = None if i % 2 else 0.95
        config = MixConfig(
            trust_region_top_p=rho,
            stability_check=False,
            force_first_token=False,
            temperature=temperature,
        )
        hint = None if i % 3 == 0 else float(rng.uniform(0, 1))
        m = mix(base_view, teacher_view, config, first_token=False, alpha_hint=hint)
        reasons[m.reason] += 1
        assert np.isfinite(m.q).all()
        assert not np.isnan(m.logq).any()
        assert math.isclose(float(m.q.sum()), 1.0, rel_tol=1e-12)
        ref = reference.distributions(base, teacher, temperature, rho)
        assert m.support.tolist() == ref.support
        assert np.isfinite(m.logq).nonzero()[0].tolist() == ref.active
        if m.reason != "solved":
            continue
        assert m.alpha is not None
        lb, lt = ref.lb_active, ref.lt_active
        logq = m.logq[ref.active]
        gap = abs(reference.kl_difference(logq, lb, lt))
        # One ulp of α moves g by about Var_q[d]·ulp(α); past that float64 cannot go.
        resolution = 4.0 * reference.variance_of_d(logq, lb, lt) * math.ulp(m.alpha)
        if gap > 1e-9:
            float_limited += 1
            assert gap <= resolution, (i, kind, temperature, gap, resolution)
            assert temperature <= 0.1, (i, kind, temperature, gap)
        slope = reference.variance_of_d(logq, lb, lt)
        if slope < 1e-4 or i % 3:
            continue  # flat g: α is ill-conditioned (q barely depends on it); 1/3 keeps it fast
        lo, hi = reference.bisect_alpha(lb, lt)
        compared += 1
        # |α − α*| ≈ |g(α)| / g′ (rounding of the reference's g included).
        slack = 2e-12 + (gap + 1e-14) / slope
        assert lo - slack <= m.alpha <= hi + slack, (i, m.alpha, lo, slack)
        worst_alpha_error = max(worst_alpha_error, abs(m.alpha - 0.5 * (lo + hi)))
    assert reasons["solved"] >= 0.8 * cases
    assert reasons["identical"] > 0  # the near-identical inputs reach rule 4 sometimes
    assert float_limited <= 0.01 * cases
    assert compared >= 0.15 * reasons["solved"]
    assert worst_alpha_error < 1e-6


logprob = st.one_of(
    st.floats(min_value=-1e4, max_value=0.0),
    st.sampled_from([-9999.0, 0.0, -1e-300, -math.inf, math.nan, math.inf, 1e-5, 0.5]),
)
view = st.dictionaries(st.integers(min_value=0, max_value=40), logprob, min_size=1, max_size=25)


@settings(max_examples=400, deadline=None)
@given(
    base=view,
    teacher=view,
    temperature=st.sampled_from([0.0, 1e-5, 1e-3, 0.5, 1.0, 2.0]),
    rho=st.sampled_from([None, 0.5, 0.95, 1.0]),
    alpha=st.sampled_from([None, None, 0.0, 0.7, 1.0]),
    top_p=st.sampled_from([1.0, 0.9, 1e-9]),
    top_k=st.sampled_from([0, -1, 1, 5]),
    first_token=st.booleans(),
)
def test_nan_or_inf_never_escapes(
    base: dict[int, float],
    teacher: dict[int, float],
    temperature: float,
    rho: float | None,
    alpha: float | None,
    top_p: float,
    top_k: int,
    first_token: bool,
) -> None:
    config = MixConfig(
        alpha=alpha, trust_region_top_p=rho, temperature=temperature, top_p=top_p, top_k=top_k
    )
    bad = any(math.isnan(v) or v > 1e-4 for v in (*base.values(), *teacher.values()))
    try:
        m = mix(_topk(base), _topk(teacher), config, first_token=first_token, alpha_hint=0.3)
    except SamplingError:
        assert bad
        return
    assert not bad
    for value in (m.js, m.overlap_mass, m.kl_gap, m.chernoff, m.filled_mass):
        assert math.isfinite(value)
    assert m.alpha is None or 0.0 <= m.alpha <= 1.0
    assert not np.isnan(m.logq).any()
    assert not (m.logq == np.inf).any()
    assert np.isfinite(m.q).all()
    assert math.isclose(float(m.q.sum()), 1.0, rel_tol=1e-9)
    assert ((m.q > 0) <= np.isfinite(m.logq)).all()


@pytest.mark.parametrize("hint", [None, 0.0, 1.0, 1e-300, 0.999999, math.nan, 5.0])
def test_any_hint_gives_the_same_root(hint: float | None) -> None:
    base = _topk({1: math.log(0.7), 2: math.log(0.2), 3: math.log(0.05)})
    teacher = _topk({1: math.log(0.1), 2: math.log(0.3), 4: math.log(0.5)})
    config = MixConfig(trust_region_top_p=None, stability_check=False)
    cold = mix(base, teacher, config, first_token=False)
    warm = mix(base, teacher, config, first_token=False, alpha_hint=hint)
    assert warm.reason == "solved"
    assert warm.kl_gap <= 1e-9
    assert cold.alpha is not None
    assert warm.alpha == pytest.approx(cold.alpha, abs=1e-9)
