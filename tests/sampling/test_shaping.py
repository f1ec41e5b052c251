"""docs/ALGORITHM.md §5a: vLLM's sampling parameters as transforms of q (app/sampling/shaping.py).

Each transform against its formula written out independently here, the draw against the
transformed q (chi-square; a test that a wrong transform fails), and the statistical
promises: a banned id never drawn, a penalised id's frequency falls as the formula says,
min_tokens never lets EOS through."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.stats import chisquare

from app.sampling import mix, mix_step
from app.sampling.shaping import History
from app.sampling.types import MixConfig, SamplingError, TopK

IDS = np.array([2, 5, 7, 9, 11], np.int64)
BASE = TopK(IDS, np.log(np.array([0.30, 0.25, 0.20, 0.15, 0.05])))
TEACHER = TopK(IDS, np.log(np.array([0.10, 0.40, 0.20, 0.20, 0.05])))
# A fixed α and no trust region: q is p_b^(1−α) p_t^α on all five ids (§5 rule 2).
PLAIN = MixConfig(alpha=0.5, trust_region_top_p=None, force_first_token=False)


def q_of(config: MixConfig, history: History | None = None) -> np.ndarray:
    return mix(BASE, TEACHER, config, first_token=False, history=history).q


def expected(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits[np.isfinite(logits)].max())
    result: np.ndarray = z / z.sum()
    return result


def test_no_transform_is_the_kernels_q_bit_for_bit() -> None:
    plain = mix(BASE, TEACHER, PLAIN, first_token=False)
    with_history = mix(
        BASE, TEACHER, PLAIN, first_token=False, history=History(prompt=frozenset({2}))
    )
    assert np.array_equal(plain.q, with_history.q)
    assert np.array_equal(plain.logq, with_history.logq)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_bias_and_penalties_follow_vllms_formulas(temperature: float) -> None:
    config = dataclasses.replace(
        PLAIN,
        temperature=temperature,
        logit_bias=((5, 1.5), (9, -2.0)),
        repetition_penalty=1.3,
        frequency_penalty=0.4,
        presence_penalty=0.25,
    )
    history = History(prompt=frozenset({7}), counts={5: 2, 11: 1})
    untransformed = dataclasses.replace(
        config, logit_bias=(), repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0
    )
    base_logq = mix(BASE, TEACHER, untransformed, first_token=False).logq
    x = base_logq.copy()
    t = temperature
    x[1] += 1.5 / t  # id 5: bias
    x[3] -= 2.0 / t  # id 9: bias
    for j in (1, 2, 4):  # ids 5, 11 (generated), 7 (prompt): repetition (log q <= 0: × r)
        x[j] = x[j] / 1.3 if x[j] > 0 else x[j] * 1.3
    x[1] -= (0.4 * 2 + 0.25) / t
    x[4] -= (0.4 * 1 + 0.25) / t
    assert np.allclose(q_of(config, history), expected(x), rtol=1e-12, atol=0)


def test_min_p_then_top_k_then_top_p() -> None:
    q = q_of(PLAIN)
    shaped = q_of(dataclasses.replace(PLAIN, min_p=0.3), History())
    keep = q >= 0.3 * q.max()
    assert np.allclose(shaped, np.where(keep, q, 0) / q[keep].sum())
    # With a penalty on, top_k comes after it (vLLM's order): the penalised top id is out.
    top = int(np.argmax(q))
    penalised = dataclasses.replace(PLAIN, presence_penalty=2.0, top_k=1)
    shaped = q_of(penalised, History(counts={int(IDS[top]): 1}))
    assert shaped[top] == 0.0
    assert np.count_nonzero(shaped) == 1


def test_min_tokens_holds_eos_back_even_when_the_nucleus_is_only_eos() -> None:
    eos = 9
    sure = TopK(IDS, np.log(np.array([0.005, 0.005, 0.005, 0.98, 0.005])))
    config = MixConfig(trust_region_top_p=0.95, force_first_token=False, alpha=0.5)
    q = mix(BASE, sure, config, first_token=False).q
    assert q[3] == 1.0  # the teacher's nucleus: EOS alone
    held = mix(BASE, sure, config, first_token=False, history=History(held=frozenset({eos}))).q
    assert held[3] == 0.0
    assert math.isclose(held.sum(), 1.0)
    only_eos = TopK(np.array([9], np.int64), np.array([0.0]))
    with pytest.raises(SamplingError):
        mix(only_eos, only_eos, config, first_token=False, history=History(held=frozenset({9})))


def draws(config: MixConfig, history: History, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = [
        mix_step(BASE, TEACHER, config, first_token=False, rng=rng, history=history).token_id
        for _ in range(count)
    ]
    return np.array([tokens.count(int(y)) for y in IDS])


def test_draws_follow_the_transformed_q_and_not_the_untransformed_one() -> None:
    config = dataclasses.replace(PLAIN, logit_bias=((2, 1.0),), frequency_penalty=0.5)
    history = History(counts={5: 1})
    n = 4000
    observed = draws(config, history, n)
    shaped = q_of(config, history)
    assert chisquare(observed, shaped * n).pvalue > 1e-3
    assert chisquare(observed, q_of(PLAIN) * n).pvalue < 1e-6  # a wrong transform fails


def test_a_banned_id_is_never_drawn_and_a_penalty_lowers_frequency_as_said() -> None:
    banned = dataclasses.replace(PLAIN, logit_bias=((5, -100.0),))
    observed = draws(banned, History(), 3000)
    assert observed[1] == 0
    penalised = dataclasses.replace(PLAIN, frequency_penalty=1.0)
    history = History(counts={5: 1})
    q = q_of(PLAIN)
    # q(5) falls by e^-1 relative to the others: q'(5) = q e^-1 / (1 - q + q e^-1).
    predicted = q[1] * math.exp(-1) / (1 - q[1] + q[1] * math.exp(-1))
    n = 4000
    frequency = draws(penalised, history, n)[1] / n
    assert abs(frequency - predicted) < 4 * math.sqrt(predicted * (1 - predicted) / n)
    assert frequency < q[1]


def test_greedy_takes_the_argmax_after_the_transforms() -> None:
    config = dataclasses.replace(PLAIN, temperature=0.0, logit_bias=((11, 5.0),))
    result = mix(BASE, TEACHER, config, first_token=False, history=History())
    assert result.greedy_token == 11


def test_a_minus_100_bias_bans_even_the_single_token_of_the_nucleus() -> None:
    sure = TopK(IDS, np.log(np.array([0.005, 0.005, 0.005, 0.98, 0.005])))
    config = MixConfig(trust_region_top_p=0.95, force_first_token=False, logit_bias=((9, -100.0),))
    rng = np.random.default_rng(1)
    for _ in range(200):
        step = mix_step(BASE, sure, config, first_token=False, rng=rng, history=History())
        assert step.token_id != 9
