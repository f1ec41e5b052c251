"""Speculative rounds keep the output law (docs/ALGORITHM.md §8): the joint law of the first
tokens drawn through rounds equals token-by-token sampling from q.

Two "models" with known full distributions over a small vocabulary (a different one for every
context) are seen through top-K views, as the upstreams show them; a drafter samples exactly as
vLLM does (its top-K renormalized at the temperature); `app.rounds.judge_round` judges. The
expected law of the first two tokens is computed exactly from `mix` (q_1(y1)·q_2(y2 | y1)); a
chi-square test on thousands of seeded sequences compares. The same test with a wrong
acceptance rule must fail, so it can.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
from scipy import stats

import app.sampling.speculative as speculative
from app.rounds import Role, RoundJudge, judge_round
from app.sampling import MixConfig, TopK, mix, sample
from app.sampling.shaping import History, shapes
from app.sampling.speculative import judge, proposal
from app.sampling.types import DRAFT_ACCEPTED, DRAFT_BONUS, DRAFT_RESAMPLED

VOCAB = 10
K = 5  # the views miss half the vocabulary: fills, the tail, the union all matter
EOS = 0
SAMPLES = 6000
ALPHA_LEVEL = 1e-3  # a correct rule fails one run in a thousand (seeded: never here)

BALANCED = MixConfig()  # first-token forcing, trust region 0.95, stability check + fallback
EXPLORE = MixConfig(force_first_token=False, trust_region_top_p=None, stability_check=False)
CONFIGS = {
    "balanced": BALANCED,
    "explore": EXPLORE,
    "trust_region_only": MixConfig(trust_region_top_p=0.8, stability_check=False),
    "fallback_often": MixConfig(js_threshold=0.05, trust_region_top_p=None),
    "hot_top_p": MixConfig(temperature=1.4, top_p=0.9, force_first_token=False),
    # §5a: the second position's q depends on the first token (a penalty on repeating it).
    "penalties": MixConfig(presence_penalty=1.5, frequency_penalty=0.5, trust_region_top_p=None),
}


@cache
def full(role: str, context: tuple[int, ...]) -> np.ndarray:
    """The model's full next-token log-probabilities after `context` (fixed per context)."""
    seed = zlib.crc32(repr((role, context)).encode())
    logits = np.random.default_rng(seed).normal(0.0, 1.6 if role == "teacher" else 1.2, VOCAB)
    if role == "base":  # related models: the base leans towards the teacher's logits
        logits += 0.6 * np.random.default_rng(
            zlib.crc32(repr(("teacher", context)).encode())
        ).normal(0.0, 1.6, VOCAB)
    logits[EOS] -= 1.0
    result: np.ndarray = logits - np.logaddexp.reduce(logits)
    return result


@cache
def view(role: str, context: tuple[int, ...]) -> TopK:
    """The top-K view vLLM would return (ties: lower id)."""
    lp = full(role, context)
    ids = np.lexsort((np.arange(VOCAB), -lp))[:K]
    return TopK(ids=ids.astype(np.int64), logprobs=lp[ids])


def draft(role: str, context: tuple[int, ...], temperature: float, rng: np.random.Generator) -> int:
    """What vLLM's sampler does with top_k = K, top_p = 1 at `temperature`."""
    v = view(role, context)
    scaled = v.logprobs / temperature
    p = np.exp(scaled - scaled.max())
    return int(v.ids[rng.choice(K, p=p / p.sum())])


def history(config: MixConfig, counts: dict[int, int]) -> History | None:
    """What the §5a transforms read (the generated ids' counts); None without them."""
    return History(counts=dict(counts)) if shapes(config) else None


def q_of(config: MixConfig, context: tuple[int, ...], first: bool) -> dict[int, float]:
    mixture = mix(
        view("base", context),
        view("teacher", context),
        config,
        first_token=first,
        history=history(config, Counter(context)),
    )
    return {
        int(y): float(p)
        for y, p in zip(mixture.support, mixture.q / mixture.q.sum(), strict=True)
        if p > 0
    }


def exact_law(config: MixConfig) -> dict[tuple[int, int], float]:
    law: dict[tuple[int, int], float] = {}
    for y1, p1 in q_of(config, (), True).items():
        if y1 == EOS:
            law[(y1, -1)] = p1
            continue
        for y2, p2 in q_of(config, (y1,), False).items():
            law[(y1, y2)] = p1 * p2
    return law


def speculative_pairs(
    config: MixConfig, drafter: Role, k: int, samples: int, seed: int
) -> Counter[tuple[int, int]]:
    """First two tokens of `samples` sequences generated in rounds of k drafts."""
    rng = np.random.default_rng(seed)
    draft_rng = np.random.default_rng(seed + 1)  # the upstream's own randomness
    scorer = "teacher" if drafter == "base" else "base"
    counts: Counter[tuple[int, int]] = Counter()
    for _ in range(samples):
        out: list[int] = []
        while len(out) < 2 and (not out or out[-1] != EOS):
            context = tuple(out)
            drafted: list[int] = []
            for _ in range(k + 1):
                drafted.append(
                    draft(drafter, context + tuple(drafted), config.temperature or 1e-9, draft_rng)
                )
            drafts = [
                (x, view(drafter, context + tuple(drafted[:i]))) for i, x in enumerate(drafted)
            ]
            scores = [view(scorer, context + tuple(drafted[:i])) for i in range(k + 1)]
            judge = RoundJudge(
                drafter,
                K,
                config,
                rng=rng,
                done=len(out),
                alpha=None,
                counts=Counter(out),
                history_of=lambda counts, done: history(config, counts),
                ends={EOS},
            )
            results = judge_round(drafts, scores, judge)
            out.extend(r.token_id for r in results)
        counts[(out[0], out[1] if out[0] != EOS else -1)] += 1
    return counts


def chi_square_p(counts: Counter[tuple[int, int]], law: dict[tuple[int, int], float]) -> float:
    """p-value of the counts under `law`; cells expected below 5 are pooled."""
    total = sum(counts.values())
    assert set(counts) <= set(law), f"drew pairs of probability 0: {set(counts) - set(law)}"
    observed: list[float] = []
    expected: list[float] = []
    pooled_o = pooled_e = 0.0
    for cell, p in law.items():
        if p * total >= 5:
            observed.append(counts.get(cell, 0))
            expected.append(p * total)
        else:
            pooled_o += counts.get(cell, 0)
            pooled_e += p * total
    if pooled_e > 0:
        observed.append(pooled_o)
        expected.append(pooled_e)
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("drafter", ["base", "teacher"])
def test_rounds_keep_the_joint_law_of_two_tokens(name: str, drafter: Role) -> None:
    config = CONFIGS[name]
    counts = speculative_pairs(config, drafter, k=2, samples=SAMPLES, seed=7)
    assert chi_square_p(counts, exact_law(config)) > ALPHA_LEVEL


def test_one_draft_per_round() -> None:
    """k = 1: a bonus token after every accepted draft."""
    counts = speculative_pairs(BALANCED, "base", k=1, samples=SAMPLES, seed=11)
    assert chi_square_p(counts, exact_law(BALANCED)) > ALPHA_LEVEL


@pytest.mark.parametrize("drafter", ["base", "teacher"])
def test_greedy_rounds_emit_the_argmaxes(drafter: Role) -> None:
    """T = 0: the drafter decodes greedily and a draft is kept only if it is q's argmax."""
    greedy = MixConfig(temperature=0.0)

    def argmax(context: tuple[int, ...]) -> int | None:
        first = not context
        return mix(
            view("base", context), view("teacher", context), greedy, first_token=first
        ).greedy_token

    y1 = argmax(())
    assert y1 is not None
    expected = (y1, argmax((y1,)) if y1 != EOS else -1)
    assert set(speculative_pairs(greedy, drafter, k=3, samples=20, seed=3)) == {expected}


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(lambda q, d: min(1.0, q), id="accept-with-q"),
        pytest.param(lambda q, d: min(1.0, 1.3 * q / d), id="too-lenient"),
    ],
)
def test_a_wrong_acceptance_rule_fails(
    monkeypatch: pytest.MonkeyPatch, wrong: Callable[[float, float], float]
) -> None:
    monkeypatch.setattr(speculative, "accept_probability", wrong)
    config = EXPLORE
    counts = speculative_pairs(config, "base", k=2, samples=SAMPLES, seed=7)
    assert chi_square_p(counts, exact_law(config)) < ALPHA_LEVEL


def test_proposal_is_the_top_k_at_the_temperature() -> None:
    v = TopK(ids=np.array([3, 1, 7, 2], np.int64), logprobs=np.log(np.array([0.5, 0.2, 0.2, 0.05])))
    ids, probs = proposal(v, 3, 0.5, drafted=7)
    assert ids.tolist() == [3, 1, 7]
    expected = np.array([0.5, 0.2, 0.2]) ** 2
    assert probs == pytest.approx(expected / expected.sum(), abs=1e-12)
    # A K+1 entry that was drafted (a tie vLLM broke the other way) joins the proposal.
    ids, _ = proposal(v, 3, 1.0, drafted=2)
    assert 2 in ids.tolist()
    ids, probs = proposal(v, 3, 0.0, drafted=1)
    assert ids.tolist() == [1]
    assert probs.tolist() == [1.0]


def test_judge_codes_and_residual() -> None:
    base = TopK(ids=np.array([1, 2], np.int64), logprobs=np.log(np.array([0.9, 0.1])))
    mixture = mix(base, base, EXPLORE, first_token=False)
    rng = np.random.default_rng(0)
    # d puts all its mass on 2, q only 0.1: accepted with probability 0.1, else 1 (residual).
    outcomes = Counter(
        judge(mixture, 2, np.array([2], np.int64), np.ones(1), rng)[0].draft for _ in range(2000)
    )
    assert set(outcomes) == {DRAFT_ACCEPTED, DRAFT_RESAMPLED}
    assert 120 < outcomes[DRAFT_ACCEPTED] < 290
    result = sample(mixture, rng)._replace(draft=DRAFT_BONUS)
    assert result.draft == DRAFT_BONUS
