"""Validation of upstream top-K views and of the options (issue 3: bad input raises, typed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.sampling import MixConfig, SamplingError, TopK, mix, mix_step, topk_from_mapping


def test_topk_from_mapping_keeps_every_entry_and_clamps_minus_infinity() -> None:
    topk = topk_from_mapping({7: -0.1, 3: -2.5, 11: -9999.0, 5: -math.inf, 9: 2e-7})
    assert topk.ids.tolist() == [7, 3, 11, 5, 9]
    assert topk.logprobs.tolist() == [-0.1, -2.5, -9999.0, -9999.0, 2e-7]
    assert topk.ids.dtype == np.int64
    assert topk.logprobs.dtype == np.float64


@pytest.mark.parametrize(
    "mapping",
    [
        {},
        {-1: -0.5},
        {1: math.nan},
        {1: math.inf},
        {1: 0.01},
        {1: -0.5, 2: math.nan},
        {"3": -0.5},
        {True: -0.5},
        {1.0: -0.5},
        {1: "x"},
        {1: None},
    ],
)
def test_topk_from_mapping_rejects_bad_input(mapping: dict[object, object]) -> None:
    with pytest.raises(SamplingError):
        topk_from_mapping(mapping)  # type: ignore[arg-type]


def _topk(ids: list[int], logprobs: list[float]) -> TopK:
    return TopK(ids=np.array(ids, dtype=np.int64), logprobs=np.array(logprobs))


GOOD = _topk([1, 2], [-0.5, -1.5])


@pytest.mark.parametrize(
    "bad",
    [
        _topk([1, 2], [-0.5, math.nan]),
        _topk([1, 2], [-0.5, math.inf]),
        _topk([1, 2], [math.inf, -math.inf]),
        _topk([1, 2], [-0.5, 0.5]),
        _topk([1, 1], [-0.5, -1.5]),  # duplicate id that the other model also has
        _topk([3, 3], [-0.5, -1.5]),  # duplicate id the other model lacks
        _topk([-1, 2], [-0.5, -1.5]),
        _topk([], []),
        TopK(ids=np.array([1, 2], dtype=np.int64), logprobs=np.array([-0.5])),
        TopK(ids=np.array([1.0, 2.0]), logprobs=np.array([-0.5, -1.5])),
    ],
)
@pytest.mark.parametrize("side", ["base", "teacher"])
def test_mix_rejects_bad_topk_from_either_side(bad: TopK, side: str) -> None:
    base, teacher = (bad, GOOD) if side == "base" else (GOOD, bad)
    with pytest.raises(SamplingError):
        mix(base, teacher, MixConfig(), first_token=False)


@pytest.mark.parametrize(
    "config",
    [
        MixConfig(alpha=1.5),
        MixConfig(alpha=-0.1),
        MixConfig(alpha=math.nan),
        MixConfig(trust_region_top_p=0.0),
        MixConfig(trust_region_top_p=1.1),
        MixConfig(js_threshold=-1.0),
        MixConfig(js_threshold=math.nan),
        MixConfig(overlap_threshold=2.0),
        MixConfig(temperature=-0.1),
        MixConfig(temperature=2.5),
        MixConfig(temperature=math.nan),
        MixConfig(top_p=0.0),
        MixConfig(top_p=1.5),
        MixConfig(top_k=-2),
    ],
)
def test_mix_rejects_bad_options(config: MixConfig) -> None:
    with pytest.raises(SamplingError):
        mix_step(GOOD, GOOD, config, first_token=False, rng=np.random.default_rng(0))


def test_below_clamp_values_are_read_as_the_clamp() -> None:
    a = mix(_topk([1, 2], [-0.1, -1e300]), GOOD, MixConfig(alpha=0.0), first_token=False)
    b = mix(_topk([1, 2], [-0.1, -9999.0]), GOOD, MixConfig(alpha=0.0), first_token=False)
    assert a.logq.tolist() == b.logq.tolist()
    assert np.isfinite(a.logq).all()
