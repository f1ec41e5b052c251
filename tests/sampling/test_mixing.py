"""§1–6 on hand-made inputs: alignment, temperature, diagnostics, trust region, every α rule,
the request's top_p/top_k, greedy decoding and the reported values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from app.sampling import MixConfig, TopK, mix, mix_step, topk_from_mapping
from tests.sampling import reference

OFF = MixConfig(trust_region_top_p=None, stability_check=False, force_first_token=False)


def tk(probs: dict[int, float]) -> TopK:
    return topk_from_mapping({y: math.log(p) for y, p in probs.items()})


BASE = {1: 0.5, 2: 0.3}
TEACHER = {2: 0.6, 3: 0.2}


def test_alignment_fills_with_min_of_smallest_known_and_tail_share() -> None:
    # base misses id 3: fill = min(0.3, 0.2 / 1) = 0.2; teacher misses id 1: min(0.2, 0.2) = 0.2.
    as_base = mix(
        tk(BASE), tk(TEACHER), MixConfig(alpha=0.0, trust_region_top_p=None), first_token=False
    )
    assert as_base.support.tolist() == [1, 2, 3]
    np.testing.assert_allclose(np.exp(as_base.logq), [0.5, 0.3, 0.2], rtol=1e-12)
    as_teacher = mix(
        tk(BASE), tk(TEACHER), MixConfig(alpha=1.0, trust_region_top_p=None), first_token=False
    )
    np.testing.assert_allclose(np.exp(as_teacher.logq), [0.2, 0.6, 0.2], rtol=1e-12)
    # id 1 came from a fill for the teacher, id 3 for the base.
    assert as_teacher.filled_mass == pytest.approx(0.4, rel=1e-12)
    assert as_teacher.overlap_count == 1


def test_fill_is_the_smallest_known_value_when_the_tail_is_larger() -> None:
    # base mass 0.3 + 0.2, tail 0.5 over 1 missing id, capped by min known 0.2.
    m = mix(
        tk({1: 0.3, 2: 0.2}),
        tk({3: 0.9}),
        MixConfig(alpha=0.0, trust_region_top_p=None),
        first_token=False,
    )
    np.testing.assert_allclose(np.exp(m.logq), np.array([0.3, 0.2, 0.2]) / 0.7, rtol=1e-12)


def test_fill_floor_when_the_known_mass_is_complete() -> None:
    m = mix(
        tk({1: 0.6, 2: 0.4}),
        tk({3: 1.0}),
        MixConfig(alpha=0.0, trust_region_top_p=None),
        first_token=False,
    )
    assert math.exp(m.logq[2]) == pytest.approx(1e-10, rel=1e-6)


def test_temperature_applies_to_both_models() -> None:
    t = 0.5
    m = mix(
        tk(BASE),
        tk(TEACHER),
        MixConfig(alpha=0.0, trust_region_top_p=None, temperature=t),
        first_token=False,
    )
    p = np.array([0.5, 0.3, 0.2]) ** (1 / t)
    np.testing.assert_allclose(np.exp(m.logq), p / p.sum(), rtol=1e-12)


def test_diagnostics_match_their_definitions() -> None:
    m = mix(tk(BASE), tk(TEACHER), OFF, first_token=False)
    pb = np.array([0.5, 0.3, 0.2])
    pt = np.array([0.2, 0.6, 0.2])
    assert m.js == pytest.approx(float(jensenshannon(pb, pt)) ** 2, rel=1e-9)
    assert m.overlap_count == 1
    assert m.overlap_mass == pytest.approx(0.3, rel=1e-12)  # min(p_b(2), p_t(2))
    # chernoff and kl_gap from the definitions at the solved α.
    assert m.reason == "solved"
    assert m.alpha is not None
    lb, lt = np.log(pb), np.log(pt)
    expected_c = -math.log(float(np.sum(pb ** (1 - m.alpha) * pt**m.alpha)))
    assert m.chernoff == pytest.approx(expected_c, rel=1e-12)
    logq = m.logq
    q = np.exp(logq)
    kl_b, kl_t = float(q @ (logq - lb)), float(q @ (logq - lt))
    assert abs(kl_b - kl_t) <= 1e-9
    assert kl_b == pytest.approx(m.chernoff, abs=1e-9)  # both KLs equal C at α*
    assert m.kl_gap <= 1e-9


def test_trust_region_keeps_the_crossing_token() -> None:
    teacher = tk({10: 0.5, 11: 0.3, 12: 0.15, 13: 0.05})
    base = tk({10: 0.25, 11: 0.25, 12: 0.25, 13: 0.25})
    cfg = MixConfig(alpha=1.0, trust_region_top_p=0.81, stability_check=False)
    m = mix(base, teacher, cfg, first_token=False)
    kept = m.support[np.isfinite(m.logq)].tolist()
    assert kept == [10, 11, 12]  # 0.5 + 0.3 < 0.81: the third id crosses and is included
    np.testing.assert_allclose(np.exp(m.logq[:3]), np.array([0.5, 0.3, 0.15]) / 0.95, rtol=1e-12)
    # Both models are restricted and renormalized: α = 0 gives the base on the nucleus.
    m0 = mix(base, teacher, MixConfig(alpha=0.0, trust_region_top_p=0.81), first_token=False)
    np.testing.assert_allclose(np.exp(m0.logq[:3]), [1 / 3] * 3, rtol=1e-12)
    assert m0.logq[3] == -np.inf


def test_trust_region_of_one_id_is_single_token_and_ties_take_the_lower_id() -> None:
    base = tk({4: 0.5, 5: 0.5})
    teacher = tk({4: 0.4, 5: 0.4, 6: 0.2})
    step = mix_step(
        base,
        teacher,
        MixConfig(trust_region_top_p=0.3),
        first_token=True,
        rng=np.random.default_rng(0),
    )
    assert step.reason == "single_token"
    assert step.alpha is None
    assert step.token_id == 4
    assert step.logprob == 0.0
    assert step.kl_gap == 0.0
    assert step.chernoff == 0.0


DISJOINT_B = {1: 0.6, 2: 0.3}
DISJOINT_T = {3: 0.6, 4: 0.3}


@pytest.mark.parametrize(
    ("config", "first_token", "base", "teacher", "reason", "alpha"),
    [
        (MixConfig(alpha=0.3), True, BASE, TEACHER, "first_token", 1.0),
        (MixConfig(alpha=0.3), False, DISJOINT_B, DISJOINT_T, "fixed", 0.3),
        (MixConfig(), False, DISJOINT_B, DISJOINT_T, "unstable", 1.0),
        (MixConfig(stability_check=False), False, DISJOINT_B, DISJOINT_T, "solved", None),
        (MixConfig(auto_fallback=False), False, DISJOINT_B, DISJOINT_T, "solved", None),
        (MixConfig(force_first_token=False, alpha=0.3), True, BASE, TEACHER, "fixed", 0.3),
        (MixConfig(trust_region_top_p=None), False, BASE, BASE, "identical", 0.5),
        (MixConfig(trust_region_top_p=None), False, BASE, TEACHER, "solved", None),
        (
            MixConfig(trust_region_top_p=None, js_threshold=0.0),
            False,
            BASE,
            TEACHER,
            "unstable",
            1.0,
        ),
        (
            MixConfig(trust_region_top_p=None, overlap_threshold=0.31),
            False,
            BASE,
            TEACHER,
            "unstable",
            1.0,
        ),
    ],
)
def test_every_alpha_rule_in_order(
    config: MixConfig,
    first_token: bool,
    base: dict[int, float],
    teacher: dict[int, float],
    reason: str,
    alpha: float | None,
) -> None:
    m = mix(tk(base), tk(teacher), config, first_token=first_token)
    assert m.reason == reason
    if alpha is not None:
        assert m.alpha == alpha
    else:
        assert m.alpha is not None
        assert 0.0 < m.alpha < 1.0
        assert m.kl_gap <= 1e-9


def test_unstable_diagnostics_of_disjoint_models() -> None:
    m = mix(tk(DISJOINT_B), tk(DISJOINT_T), MixConfig(trust_region_top_p=None), first_token=False)
    assert m.overlap_count == 0
    assert m.overlap_mass == 0.0
    assert m.filled_mass == pytest.approx(1.0)
    assert m.reason == "unstable"
    # fills: min(0.3, 0.1 / 2) = 0.05 on each side
    pb, pt = [0.6, 0.3, 0.05, 0.05], [0.05, 0.05, 0.6, 0.3]
    assert m.js == pytest.approx(float(jensenshannon(pb, pt)) ** 2, rel=1e-9)


def test_non_solved_kl_gap_and_chernoff_are_at_the_alpha_used() -> None:
    m = mix(tk(BASE), tk(TEACHER), MixConfig(alpha=0.2, trust_region_top_p=None), first_token=False)
    ref = reference.distributions(
        {y: math.log(p) for y, p in BASE.items()},
        {y: math.log(p) for y, p in TEACHER.items()},
        1.0,
        None,
    )
    logq = reference.log_q(ref.lb, ref.lt, 0.2)
    assert m.kl_gap == pytest.approx(abs(reference.kl_difference(logq, ref.lb, ref.lt)), rel=1e-9)
    np.testing.assert_allclose(m.logq, logq, rtol=1e-12)


def test_request_top_k_then_top_p_on_q() -> None:
    probs = {1: 0.4, 2: 0.25, 3: 0.2, 4: 0.1, 5: 0.05}
    cfg = MixConfig(alpha=0.0, trust_region_top_p=None, top_k=3)
    m = mix(tk(probs), tk(probs), cfg, first_token=False)
    np.testing.assert_allclose(np.exp(m.logq[:3]), np.array([0.4, 0.25, 0.2]) / 0.85, rtol=1e-12)
    assert m.logq[3:].tolist() == [-np.inf, -np.inf]
    assert m.q[3:].tolist() == [0.0, 0.0]
    # top_p acts on the top_k-renormalized q: 0.4/0.85 = 0.47 < 0.5, crossing id 2 included.
    m = mix(
        tk(probs),
        tk(probs),
        MixConfig(alpha=0.0, trust_region_top_p=None, top_k=3, top_p=0.5),
        first_token=False,
    )
    assert np.isfinite(m.logq).tolist() == [True, True, False, False, False]
    np.testing.assert_allclose(m.q[:2], np.array([0.4, 0.25]) / 0.65, rtol=1e-12)
    m = mix(
        tk(probs),
        tk(probs),
        MixConfig(alpha=0.0, trust_region_top_p=None, top_p=0.4),
        first_token=False,
    )
    assert np.isfinite(m.logq).tolist() == [True, False, False, False, False]


def test_greedy_takes_the_argmax_of_q_at_temperature_one_without_drawing() -> None:
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    base = tk({1: 0.3, 2: 0.3, 3: 0.4})
    teacher = tk({1: 0.45, 2: 0.45, 3: 0.1})
    step = mix_step(
        base,
        teacher,
        MixConfig(temperature=0.0, alpha=0.5, trust_region_top_p=None),
        first_token=False,
        rng=rng,
    )
    assert rng.bit_generator.state == before
    assert step.token_id == 1  # ids 1 and 2 tie on q; the lower id wins
    expected = mix(
        base,
        teacher,
        MixConfig(temperature=1.0, alpha=0.5, trust_region_top_p=None),
        first_token=False,
    )
    assert step.logprob == pytest.approx(float(expected.logq[0]), rel=1e-12)


def test_k_plus_one_entries_are_all_used() -> None:
    base = tk({1: 0.5, 2: 0.2, 99: 0.01})  # 99: the sampled token outside the top 2
    m = mix(
        base, tk({1: 0.5, 2: 0.2}), MixConfig(alpha=0.0, trust_region_top_p=None), first_token=False
    )
    assert m.support.tolist() == [1, 2, 99]
    np.testing.assert_allclose(np.exp(m.logq), np.array([0.5, 0.2, 0.01]) / 0.71, rtol=1e-12)
    assert m.overlap_count == 2
