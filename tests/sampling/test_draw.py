"""The draw (§5), seeded generators (§7) and top-N logprobs of q."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chisquare

from app.sampling import (
    MixConfig,
    SamplingError,
    TopK,
    make_generators,
    mix,
    mix_step,
    sample,
    top_logprobs,
    topk_from_mapping,
)

BASE = topk_from_mapping({3: math.log(0.4), 5: math.log(0.3), 8: math.log(0.2), 13: math.log(0.05)})
TEACHER = topk_from_mapping(
    {3: math.log(0.1), 5: math.log(0.5), 9: math.log(0.25), 13: math.log(0.1)}
)
CONFIG = MixConfig(trust_region_top_p=None, stability_check=False)


def test_draw_frequencies_match_q() -> None:
    mixture = mix(BASE, TEACHER, CONFIG, first_token=False)
    assert mixture.reason == "solved"
    rng = make_generators(20240611, 1)[0]
    draws = 20000
    counts = dict.fromkeys(mixture.support.tolist(), 0)
    for _ in range(draws):
        counts[sample(mixture, rng).token_id] += 1
    observed = np.array(list(counts.values()))
    expected = mixture.q * draws
    assert chisquare(observed, expected).pvalue > 1e-3
    # and the test can fail: the same draws are far from p_b.
    as_base = mix(BASE, TEACHER, MixConfig(alpha=0.0, trust_region_top_p=None), first_token=False)
    assert chisquare(observed, as_base.q * draws).pvalue < 1e-6


def test_dropped_ids_are_never_drawn_and_logprob_is_log_q() -> None:
    config = MixConfig(trust_region_top_p=None, stability_check=False, top_k=2)
    rng = make_generators(7, 1)[0]
    seen = set()
    for _ in range(500):
        step = mix_step(BASE, TEACHER, config, first_token=False, rng=rng)
        seen.add(step.token_id)
        position = step.support.tolist().index(step.token_id)
        assert step.logprob == step.logq[position]
        assert np.isfinite(step.logprob)
    finite = step.support[np.isfinite(step.logq)].tolist()
    assert seen == set(finite)
    assert len(finite) == 2


def _run(seed: int, choices: int, steps: int) -> list[list[tuple[int, str]]]:
    rngs = make_generators(seed, choices)
    out = []
    for rng in rngs:
        hint = None
        tokens = []
        for i in range(steps):
            step = mix_step(
                BASE, TEACHER, MixConfig(), first_token=i == 0, rng=rng, alpha_hint=hint
            )
            hint = step.alpha
            tokens.append((step.token_id, step.logprob.hex()))
        out.append(tokens)
    return out


def test_seeded_runs_are_byte_for_byte_reproducible_and_choices_independent() -> None:
    first = _run(1234, 3, 60)
    assert first == _run(1234, 3, 60)
    assert first != _run(1235, 3, 60)
    assert first[0] != first[1]
    assert first[1] != first[2]


def test_generators_are_children_of_the_seed_sequence() -> None:
    ours = make_generators(99, 2)
    children = np.random.SeedSequence(99).spawn(2)
    for rng, child in zip(ours, children, strict=True):
        assert rng.random() == np.random.Generator(np.random.PCG64(child)).random()
    unseeded = make_generators(None, 2)
    assert unseeded[0].random() != unseeded[1].random()
    assert make_generators(5, 0) == []
    with pytest.raises(SamplingError):
        make_generators(5, -1)


def test_top_logprobs_order_ties_and_dropped_ids() -> None:
    probs = {7: 0.3, 2: 0.3, 4: 0.25, 9: 0.15}
    topk = topk_from_mapping({y: math.log(p) for y, p in probs.items()})
    config = MixConfig(alpha=0.0, trust_region_top_p=None, top_k=3)
    step = mix_step(topk, topk, config, first_token=False, rng=make_generators(0, 1)[0])
    top = top_logprobs(step, 2)
    assert list(top) == [2, 7]  # equal q: lower id first
    assert top[2] == pytest.approx(math.log(0.3 / 0.85), rel=1e-12)
    assert list(top_logprobs(step, 20)) == [2, 7, 4]  # id 9 was dropped by top_k: not listed
    assert top_logprobs(step, 0) == {}


def _single(token: int) -> TopK:
    return topk_from_mapping({token: 0.0})


def test_single_token_step_draws_that_token() -> None:
    step = mix_step(
        _single(42), _single(42), MixConfig(), first_token=False, rng=make_generators(1, 1)[0]
    )
    assert step.token_id == 42
    assert step.reason == "single_token"
    assert step.alpha is None
    assert step.logprob == 0.0
    assert step.support_size == 1
