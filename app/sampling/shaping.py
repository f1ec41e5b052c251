"""The request's vLLM sampling parameters applied to q (docs/ALGORITHM.md §5a).

`min_tokens`, `logit_bias`, `repetition_penalty`, `frequency_penalty`, `presence_penalty`,
`min_p`, then `top_k` and `top_p`: vLLM's order and formulas (its sampler: the logits
processors that can change the argmax, then the penalties, then temperature, min_p, top-k,
top-p), with log q of §5 in the place of vLLM's tempered logits. q is already tempered (§2),
so every additive term (bias, penalties) is divided by T, which is what vLLM's
(logit + term) / T gives; the repetition penalty multiplies, which commutes with 1/T.

Plain numpy on the support of one step (a few dozen ids), after the compiled kernel: the
kernel is untouched, and runs with top_k / top_p off when these transforms are on so that
they come after the penalties, as in vLLM. Nothing here runs for a request that sets none of
them (`active`), so the default path is unchanged bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from app.sampling.types import MixConfig, Mixture, SamplingError

GREEDY_TEMPERATURE = 1e-5  # kernel.GREEDY_TEMPERATURE (vLLM's _SAMPLING_EPS)
TIE_TOLERANCE = 1e-12  # kernel.TIE_TOLERANCE: a cumulative mass this close to top_p reaches it
MAX_BIAS = 100.0  # vLLM clamps logit_bias values to [-100, 100]


@dataclass(frozen=True, slots=True)
class History:
    """What the penalties and `min_tokens` need of one sequence at one step."""

    prompt: frozenset[int] = frozenset()  # the prompt's ids (repetition_penalty)
    counts: Mapping[int, int] = field(default_factory=dict)  # generated id -> times generated
    held: frozenset[int] = frozenset()  # ids held back now (min_tokens not reached yet)


def shapes(config: MixConfig) -> bool:
    """Whether `config` sets any transform of this module (min_tokens aside)."""
    return (
        config.min_p > 0.0
        or config.presence_penalty != 0.0
        or config.frequency_penalty != 0.0
        or config.repetition_penalty != 1.0
        or bool(config.logit_bias)
    )


def active(config: MixConfig, history: History | None) -> bool:
    """Whether this step needs `shape` at all."""
    return shapes(config) or (history is not None and bool(history.held))


def shape(mixture: Mixture, config: MixConfig, history: History) -> Mixture:
    """q after the request's transforms, renormalized; `greedy_token` re-taken (T = 0).

    Ids the trust region (or the kernel) already gave q = 0 stay at 0: a bias or a penalty
    moves mass between the ids q has, it does not create mass. Raises SamplingError when
    `history.held` and -100 biases take every id with q > 0 (the caller then widens the
    support)."""
    support = mixture.support
    ids = support.tolist()
    x = mixture.logq.copy()
    greedy = config.temperature < GREEDY_TEMPERATURE
    inverse_t = 1.0 if greedy else 1.0 / config.temperature
    bias = dict(config.logit_bias)
    r = config.repetition_penalty
    f = config.frequency_penalty
    p = config.presence_penalty
    for j, y in enumerate(ids):
        value = x[j]
        if value == -math.inf:
            continue
        b = bias.get(y, 0.0)
        # min_tokens: EOS and stop ids cannot end the output yet; a bias of -100 (vLLM's
        # floor, a factor e^-100) is a ban: q = 0 rather than ~1e-44.
        if y in history.held or b <= -MAX_BIAS:
            x[j] = -math.inf
            continue
        value += b * inverse_t
        count = history.counts.get(y, 0)
        if r != 1.0 and (count or y in history.prompt):
            value = value / r if value > 0 else value * r
        if count:
            value -= (f * count + p) * inverse_t
        x[j] = value
    finite = x != -math.inf
    if not finite.any():
        raise SamplingError("min_tokens or a -100 logit_bias removes every id of the support")
    x -= x[finite].max()
    q = np.where(finite, np.exp(x), 0.0)
    q /= q.sum()
    if config.min_p > 0.0:  # vLLM: drop p < min_p · max p
        q[q < config.min_p * q.max()] = 0.0
    keep = _top_k_top_p(x, q, config.top_k, config.top_p)
    if keep is not None:
        kept = np.zeros_like(q)
        kept[keep] = q[keep]
        q = kept
    q /= q.sum()
    with np.errstate(divide="ignore"):
        logq = np.log(q)
    greedy_token = int(support[int(np.argmax(logq))]) if greedy else None
    return mixture._replace(logq=logq, q=q, greedy_token=greedy_token)


def _top_k_top_p(x: np.ndarray, q: np.ndarray, top_k: int, top_p: float) -> np.ndarray | None:
    """kernel.request_filter in numpy: positions kept by top_k then top_p (ordered by x, ties
    lower id first), or None when nothing is dropped."""
    alive = int(np.count_nonzero(q))
    if not (0 < top_k < alive or top_p < 1.0):
        return None
    order = np.argsort(-np.where(q > 0, x, -math.inf), kind="stable")[:alive]
    if 0 < top_k < alive:
        order = order[:top_k]
    if top_p < 1.0:
        cumulative = np.cumsum(q[order])
        target = top_p * cumulative[-1] * (1.0 - TIE_TOLERANCE)
        order = order[: int(np.searchsorted(cumulative, target, side="left")) + 1]
    return order
