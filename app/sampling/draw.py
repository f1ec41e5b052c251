"""Randomness and read-outs of a step: the draw from q (§5), per-request generators (§7),
and the top-N of log q for OpenAI `logprobs`."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from app.sampling.types import DRAFT_NONE, Mixture, SamplingError, StepResult

_accumulate = np.add.accumulate


def make_generators(seed: int | None, count: int) -> list[np.random.Generator]:
    """`count` independent generators for the choices of one request (docs/ALGORITHM.md §7):
    children of `SeedSequence(seed)` (fresh OS entropy when `seed` is None), never the global
    numpy RNG. The same seed gives the same generators, so the same tokens byte for byte."""
    if count < 0:
        raise SamplingError("count must be >= 0")
    if seed is not None and seed < 0:
        raise SamplingError("seed must be >= 0")
    children = np.random.SeedSequence(seed).spawn(count)
    return [np.random.Generator(np.random.PCG64(child)) for child in children]


def sample(mixture: Mixture, rng: np.random.Generator) -> StepResult:
    """Draw the token from the mixture's q (inverse CDF over ids in increasing order, one
    `rng.random()` per step), or take `greedy_token` without touching `rng` (T = 0)."""
    support = mixture.support
    greedy_token = mixture.greedy_token
    if greedy_token is not None:
        position = int(support.searchsorted(greedy_token))
    else:
        position = draw_position(mixture.q, rng)
    return result_at(mixture, position)


def draw_position(weights: npt.NDArray[np.float64], rng: np.random.Generator) -> int:
    """The position drawn from `weights` (non-negative, not necessarily normalized) by the
    inverse CDF with one `rng.random()`: never a position of weight 0."""
    cumulative = _accumulate(weights)
    # side="right": the first id whose cumulative q exceeds u, so never an id with q = 0.
    position = int(cumulative.searchsorted(rng.random() * cumulative[-1], side="right"))
    if position >= weights.shape[0]:  # u·Σq rounded up to Σq
        position = int(np.flatnonzero(weights)[-1])
    return position


def result_at(mixture: Mixture, position: int, draft: int = DRAFT_NONE) -> StepResult:
    """The step's outputs (§6) with the token at `position` of the support."""
    (support, logq, _, _, alpha, reason, js, overlap_count, overlap_mass, kl_gap, chernoff,
     filled_mass) = mixture  # fmt: skip
    return StepResult(
        int(support[position]),
        float(logq[position]),
        alpha,
        reason,
        js,
        overlap_count,
        overlap_mass,
        kl_gap,
        chernoff,
        support.shape[0],
        filled_mass,
        support,
        logq,
        draft,
    )


def top_logprobs(result: StepResult, n: int) -> dict[int, float]:
    """The n largest log q(y) of the distribution sampled from (ties: lower id first), in that
    order; only ids with q > 0 (finite log q), so possibly fewer than n."""
    if n <= 0:
        return {}
    pairs = [
        (lq, y)
        for y, lq in zip(result.support.tolist(), result.logq.tolist(), strict=True)
        if lq != -np.inf
    ]
    pairs.sort(key=lambda pair: (-pair[0], pair[1]))
    return {y: lq for lq, y in pairs[:n]}
