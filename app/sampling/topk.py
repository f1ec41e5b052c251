"""Reading one upstream's top-K view (docs/ALGORITHM.md §0), refusing what the math cannot use."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from app.sampling.types import SamplingError, TopK

# vLLM clamps -inf logprobs to -9999.0 so they survive JSON; we keep that value as the finite
# log-probability it is reported as (anything lower, including -inf, is read as the clamp), so
# every log stays finite and no NaN can arise from 0 * log 0 or -inf - -inf later on.
CLAMP_LOGPROB = -9999.0
# Logprobs are float32 on the upstream: log(1) may come back as a tiny positive number.
POSITIVE_TOLERANCE = 1e-4


def topk_from_mapping(mapping: Mapping[int, float]) -> TopK:
    """Build a validated `TopK` from `{token_id: logprob}` (K or K+1 entries, any order).

    Raises `SamplingError` on an empty mapping, non-integer or negative ids, NaN, +inf, or a
    logprob above 0 beyond float rounding (1e-4). Values below -9999 (including -inf) become
    -9999, the value vLLM reports for -inf.
    """
    if not mapping:
        raise SamplingError("empty top-K logprobs")
    keys, values_ = mapping.keys(), mapping.values()
    if all(type(k) is int for k in keys) and all(type(v) is float for v in values_):
        # The common case (plain ints and floats, as parsed from JSON): vectorised checks,
        # ~4x faster than the loop below, which gives the precise message on a failure.
        n = len(mapping)
        ids_array = np.fromiter(keys, dtype=np.int64, count=n)
        lps = np.fromiter(values_, dtype=np.float64, count=n)
        if ids_array.min() >= 0 and not np.isnan(lps).any() and lps.max() <= POSITIVE_TOLERANCE:
            return TopK(ids=ids_array, logprobs=np.maximum(lps, CLAMP_LOGPROB))
    ids: list[int] = []
    values: list[float] = []
    for key, value in mapping.items():
        if isinstance(key, bool) or not isinstance(key, int | np.integer):
            raise SamplingError(f"token id {key!r} is not an integer")
        if key < 0:
            raise SamplingError(f"negative token id {key}")
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
            raise SamplingError(f"logprob of token {key} is not a number")
        lp = float(value)
        if math.isnan(lp) or lp > POSITIVE_TOLERANCE:
            raise SamplingError(f"invalid logprob {lp!r} for token {key}")
        ids.append(int(key))
        values.append(max(lp, CLAMP_LOGPROB))
    return TopK(ids=np.array(ids, dtype=np.int64), logprobs=np.array(values, dtype=np.float64))
