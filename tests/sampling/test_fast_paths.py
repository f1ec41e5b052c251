"""The shortcuts the hot path takes (bench/sampling.py, issue 3) give what the general path
gives: the kernel's moments-free evaluation for imposed α, the solver's early exit for rule 4,
the JS underflow guard taken only when a row can underflow, the fill computed from e^logprob, and
exact ties between a fill and the smallest known value."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from app.sampling import MixConfig, TopK, mix, mix_step, topk_from_mapping
from app.sampling.kernel import evaluate, solve
from tests.sampling import reference

Array = npt.NDArray[np.float64]


def _random_stack(rng: np.random.Generator, n: int, scale: float) -> tuple[Array, Array]:
    """(log p_b, d) in the trust region's layout: log p_b = -inf and d = 0 outside."""
    lb = rng.normal(0.0, 3.0, n)
    lb -= reference.logsumexp(lb)
    lt = lb + rng.normal(0.0, scale, n)
    lt -= reference.logsumexp(lt)
    outside = rng.random(n) < 0.3
    outside[0] = False
    lb[outside] = -np.inf
    d = np.where(outside, 0.0, lt - lb)
    return lb, d


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_plain_evaluation_matches_the_moments_evaluation(alpha: float) -> None:
    rng = np.random.default_rng(11)
    for i in range(300):
        lb, d = _random_stack(rng, int(rng.integers(1, 60)), float(rng.uniform(0.01, 5.0)))
        if i % 10 == 0:
            lb -= 800.0  # z underflows: both must take the shifted branch
        x_plain, w_plain, x_full, w_full = (np.empty_like(d) for _ in range(4))
        g_plain, var, skew, shift_plain, z_plain = evaluate(lb, d, alpha, False, x_plain, w_plain)
        g_full, _, _, shift_full, z_full = evaluate(lb, d, alpha, True, x_full, w_full)
        assert var == skew == 0.0
        np.testing.assert_array_equal(x_plain, x_full)
        np.testing.assert_array_equal(w_plain, w_full)
        assert shift_plain == shift_full
        assert z_plain == pytest.approx(z_full, rel=1e-14)
        assert g_plain == pytest.approx(g_full, rel=1e-12, abs=1e-15)


def test_solver_reports_identical_exactly_when_max_d_squared_is_below_the_tolerance() -> None:
    rng = np.random.default_rng(12)
    tolerance = 1e-12
    seen = {True: 0, False: 0}
    for i in range(2000):
        n = int(rng.integers(1, 40))
        lb = rng.normal(0.0, 3.0, n)
        lb -= reference.logsumexp(lb)
        d = rng.uniform(-1.0, 1.0, n) * tolerance * 10.0 ** rng.uniform(-2.0, 0.5)
        if i % 4 == 0:  # one large d on an id q barely sees: E_q[d²] tiny, max d² not
            d[:] = 0.0
            lb[0] = -60.0
            lb -= reference.logsumexp(lb)
            d[0] = tolerance * rng.uniform(0.5, 3.0)
        expected = float(np.max(d * d)) < tolerance**2
        hint = float(rng.uniform(0.0, 1.0))
        found, *_ = solve(lb, d, hint, tolerance, np.empty_like(d), np.empty_like(d))
        assert (not found) == expected, (i, float(np.max(np.abs(d))))
        seen[expected] += 1
    assert min(seen.values()) > 300  # both outcomes exercised


def _js(pb: np.ndarray, pt: np.ndarray) -> float:
    """JS from its definition, 0·log 0 = 0 handled explicitly."""
    m = 0.5 * (pb + pt)
    total = 0.0
    for p in (pb, pt):
        live = p > 0
        total += 0.5 * float(np.sum(p[live] * np.log(p[live] / m[live])))
    return total


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1e-3])
@pytest.mark.parametrize("clamped", [False, True])
def test_js_with_and_without_the_underflow_guard_matches_the_definition(
    temperature: float, clamped: bool
) -> None:
    base = {1: math.log(0.6), 2: math.log(0.3), 3: math.log(0.05)}
    teacher = {1: math.log(0.2), 2: math.log(0.5), 4: math.log(0.2)}
    if clamped:  # ids both models report as -9999: p_b = p_t = 0 there, s = 0
        base |= {7: -9999.0, 8: -9999.0}
        teacher |= {7: -9999.0, 8: -9999.0}
    m = mix(
        topk_from_mapping(base),
        topk_from_mapping(teacher),
        MixConfig(alpha=0.0, trust_region_top_p=None, temperature=temperature),
        first_token=False,
    )
    ref = reference.distributions(base, teacher, temperature, None)
    assert math.isfinite(m.js)
    assert m.js == pytest.approx(_js(np.exp(ref.lb), np.exp(ref.lt)), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("offset", [0.0, -700.0, -745.0, -800.0, -5000.0])
def test_fill_from_e_to_the_logprob_and_its_underflow_fallback_match_the_reference(
    offset: float,
) -> None:
    # The base's values sit at `offset`: below about -690, e^top underflows and the fill is
    # computed from the logs instead.
    base = {1: offset - 0.1, 2: offset - 1.0, 3: offset - 2.5}
    teacher = {1: math.log(0.5), 4: math.log(0.3), 5: math.log(0.1)}
    m = mix(
        topk_from_mapping(base),
        topk_from_mapping(teacher),
        MixConfig(alpha=0.0, trust_region_top_p=None),
        first_token=False,
    )
    ref = reference.distributions(base, teacher, 1.0, None)
    np.testing.assert_allclose(m.logq, ref.lb, rtol=1e-12, atol=1e-12)


def test_a_fill_equal_to_the_smallest_known_value_ties_exactly_and_the_lower_id_wins() -> None:
    # Teacher misses id 10: fill = min(0.2, tail 0.3 / 1) = 0.2, the value of its id 30. The
    # nucleus for ρ = 0.7 crosses inside that tie (0.5/0.9 < 0.7): id 10, the lower, is taken.
    base = topk_from_mapping({10: math.log(0.4), 20: math.log(0.3), 30: math.log(0.2)})
    teacher = topk_from_mapping({20: math.log(0.5), 30: math.log(0.2)})
    step = mix_step(
        base,
        teacher,
        MixConfig(alpha=1.0, trust_region_top_p=0.7),
        first_token=False,
        rng=np.random.default_rng(0),
    )
    kept = step.support[np.isfinite(step.logq)].tolist()
    assert kept == [10, 20]
    np.testing.assert_allclose(np.exp(step.logq[:2]), [0.2 / 0.7, 0.5 / 0.7], rtol=1e-12)


def test_topk_with_non_native_dtypes_gives_the_same_step() -> None:
    ids = np.array([3, 9, 4], dtype=np.int64)
    logprobs = np.log(np.array([0.5, 0.3, 0.1]))
    native = TopK(ids=ids, logprobs=logprobs)
    other = TopK(ids=ids.astype(">i8"), logprobs=logprobs.astype(">f8"))
    small = TopK(ids=ids.astype(np.int32), logprobs=logprobs)
    teacher = topk_from_mapping({3: math.log(0.2), 9: math.log(0.6), 7: math.log(0.1)})
    config = MixConfig(trust_region_top_p=None, stability_check=False)
    results = [
        mix_step(view, teacher, config, first_token=False, rng=np.random.default_rng(3))
        for view in (native, other, small)
    ]
    for result in results[1:]:
        assert result.token_id == results[0].token_id
        assert result.alpha == results[0].alpha
        np.testing.assert_array_equal(result.logq, results[0].logq)
