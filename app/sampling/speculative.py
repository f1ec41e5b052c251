"""The judgement of a speculative round (docs/ALGORITHM.md §8): accept a drafted token or draw
from the residual, so every emitted token is distributed exactly as q.

A drafter proposes x_i from d_i, its own top-K renormalized at the request's temperature (it
samples with `top_k = K`, `top_p = 1` and no penalties, so d_i is computable from the raw
logprobs it returns: `proposal`). At position i, with q_i the step's final sampling
distribution (`Mixture.q`, everything of §1–5a applied), `judge` accepts x_i with probability
min(1, q_i(x_i)/d_i(x_i)) and otherwise draws from normalize(max(0, q_i − d_i)). For any d_i
whose support holds x_i's, the token this gives is distributed as q_i (Leviathan et al. 2023,
Chen et al. 2023): P(y) = min(q(y), d(y)) + (1 − Σ min(q, d))·max(0, q(y) − d(y))/Σ max(0, q − d)
= q(y). d_i may depend on everything before position i (the drafter, k), never on x_i's draw.

Greedy (T = 0): the drafter decodes greedily, d_i = δ(x_i), and the rule reduces to "accept when
x_i is q_i's argmax, else emit that argmax", without randomness.

Pure numpy on one step's support; no I/O.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from app.sampling.draw import draw_position, result_at
from app.sampling.types import (
    DRAFT_ACCEPTED,
    DRAFT_RESAMPLED,
    Mixture,
    SamplingError,
    StepResult,
    TopK,
)

GREEDY_TEMPERATURE = 1e-5  # kernel.GREEDY_TEMPERATURE (vLLM's _SAMPLING_EPS)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def proposal(view: TopK, k: int, temperature: float, drafted: int) -> tuple[IntArray, FloatArray]:
    """d: the distribution the drafter sampled `drafted` from, as (ids, probabilities).

    vLLM samples from softmax(logits / T) restricted to the logits at or above the K-th
    largest (ties kept), and reports raw logprobs (log softmax of the logits), so
    d(y) ∝ exp(logprob(y) / T) over the returned entries at or above the K-th largest. The
    drafted id is always included (it was sampled, so it passed vLLM's cut: a tie the top-K
    list broke the other way). T = 0: greedy, d = δ(drafted)."""
    ids = view.ids
    if temperature < GREEDY_TEMPERATURE:
        return np.array([drafted], dtype=np.int64), np.ones(1)
    logprobs = view.logprobs
    keep = np.ones(ids.shape[0], dtype=bool)
    if ids.shape[0] > k:
        threshold = np.partition(logprobs, ids.shape[0] - k)[ids.shape[0] - k]
        keep = (logprobs >= threshold) | (ids == drafted)
    if not (ids[keep] == drafted).any():
        raise SamplingError(f"the drafted token {drafted} is not in the drafter's top-K")
    scaled = logprobs[keep] / temperature
    weights = np.exp(scaled - scaled.max())
    return ids[keep], weights / weights.sum()


def accept_probability(q_x: float, d_x: float) -> float:
    """min(1, q(x)/d(x)) for a drafted x with d(x) > 0 (module-level so a test can replace it
    with a wrong rule and see the law test fail)."""
    return 1.0 if q_x >= d_x else q_x / d_x


def judge(
    mixture: Mixture,
    drafted: int,
    proposal_ids: IntArray,
    proposal_probs: FloatArray,
    rng: np.random.Generator,
) -> tuple[StepResult, bool]:
    """The token at this position of a round and whether it was the drafted one (see the
    module docstring). Uses one `rng.random()` for the acceptance and one more for a residual
    draw; none at T = 0 (`mixture.greedy_token`)."""
    support = mixture.support
    greedy = mixture.greedy_token
    if greedy is not None:
        position = int(support.searchsorted(greedy))
        accepted = greedy == drafted
        code = DRAFT_ACCEPTED if accepted else DRAFT_RESAMPLED
        return result_at(mixture, position, code), accepted
    q = mixture.q / mixture.q.sum()
    d = np.zeros_like(q)
    where = support.searchsorted(proposal_ids)
    inside = where < support.shape[0]
    if not inside.all() or (support[where] != proposal_ids).any():
        raise SamplingError("the drafter's proposal is not inside the step's support")
    d[where] = proposal_probs
    x = int(support.searchsorted(drafted))
    if rng.random() < accept_probability(float(q[x]), float(d[x])):
        return result_at(mixture, x, DRAFT_ACCEPTED), True
    residual = np.maximum(q - d, 0.0)
    if not residual.any():  # q == d up to rounding: a rejection had (almost) no probability
        residual = q
    return result_at(mixture, draw_position(residual, rng), DRAFT_RESAMPLED), False
