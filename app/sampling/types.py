"""The data of one mixing step (docs/ALGORITHM.md §0, §5, §6). Pure data: no I/O, no app imports.

These types are the contract between the math and the rest of the service; the coordinator,
the HTTP layer, metrics and the batch writer read `StepResult` and nothing else of the math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

Reason = Literal["first_token", "fixed", "unstable", "identical", "single_token", "solved"]
REASONS: tuple[Reason, ...] = (
    "first_token",
    "fixed",
    "unstable",
    "identical",
    "single_token",
    "solved",
)


class SamplingError(ValueError):
    """Input the math cannot use (NaN/inf logprobs, empty top-K, bad options).

    Raised instead of letting NaN or inf escape into q (docs/ALGORITHM.md; issue 3).
    """


@dataclass(frozen=True, slots=True)
class TopK:
    """One upstream's top-K view of the next token, keyed by token id (docs/ALGORITHM.md §0).

    `ids` are unique non-negative token ids; `logprobs` are raw natural-log probabilities
    as vLLM returns them (possibly -9999.0 for clamped -inf), K or K+1 entries.
    """

    ids: npt.NDArray[np.int64]
    logprobs: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class MixConfig:
    """Per-request options of the math: `mixing.*` of README.md plus OpenAI sampling fields."""

    alpha: float | None = None
    force_first_token: bool = True
    trust_region_top_p: float | None = 0.95
    stability_check: bool = True
    js_threshold: float = 0.5
    overlap_threshold: float = 0.1
    auto_fallback: bool = True
    # OpenAI / vLLM sampling options, applied as docs/ALGORITHM.md §2 and §5 say.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off (vLLM's convention)
    # vLLM's sampling parameters, applied to q as docs/ALGORITHM.md §5a says
    # (app/sampling/shaping.py); min_tokens lives in the step's History.
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), bias in [-100, 100]


class StepResult(NamedTuple):
    """Outputs of one step (docs/ALGORITHM.md §6).

    `support` and `logq` are the final sampling distribution over the support (after the
    trust region and the request's top_p/top_k; log q, -inf outside what survived), so
    callers can report top-N logprobs of q without redoing the math.

    An immutable NamedTuple (like `Mixture`), built once per generated token: a frozen
    dataclass's __init__ costs ~1.5–3 µs on this CPU, this ~0.3 µs. Read it by field name.
    """

    token_id: int
    logprob: float  # log q(token)
    alpha: float | None  # None when reason == "single_token"
    reason: Reason
    js: float
    overlap_count: int
    overlap_mass: float
    kl_gap: float
    chernoff: float
    support_size: int  # |S|, the aligned support of §1 (before the trust region)
    filled_mass: float
    support: npt.NDArray[np.int64]
    logq: npt.NDArray[np.float64]
    # docs/ALGORITHM.md §8: how a speculative round produced this token (DRAFT_* codes);
    # DRAFT_NONE for a token-by-token step.
    draft: int = 0
    # docs/ALGORITHM.md §9 (app/sampling/certify.py), set by the engine when asked for: an upper
    # bound on TV(q, full-vocabulary q*); each model's raw logprob of the token, exact when the
    # model returned the id (its `*_exact` True), else an upper bound.
    uncertain_mass: float | None = None
    base_logprob: float | None = None
    teacher_logprob: float | None = None
    base_exact: bool | None = None
    teacher_exact: bool | None = None
    # With a tolerance (`max_uncertain_mass`): whether uncertain_mass ended within it, and how
    # many fetches of more values the step made (app/certified.py).
    certified: bool | None = None
    refetches: int = 0


# `StepResult.draft`: a token-by-token step; a drafted token the round accepted; the token drawn
# from the residual after a drafted token was rejected; the extra token drawn from q after every
# draft of the round was accepted.
DRAFT_NONE, DRAFT_ACCEPTED, DRAFT_RESAMPLED, DRAFT_BONUS = 0, 1, 2, 3
DRAFT_NAMES: tuple[str | None, ...] = (None, "accepted", "resampled", "bonus")


class Mixture(NamedTuple):
    """The deterministic part of one step (docs/ALGORITHM.md §1–5): q and the diagnostics, no draw.

    Kept apart from the draw so speculative rounds (§8) can read q_i without sampling and
    certified support (§9) can add an `uncertain_mass` and a "fetch more" decision here.

    `support` is S (§1, sorted ids); `logq` the final sampling distribution over S (after the
    trust region and the request's top_p/top_k, renormalized; -inf for dropped ids).
    `q` is the same distribution as probabilities (0 for dropped ids), what the draw uses.
    `greedy_token` is set for T = 0 (argmax of q, ties lowest id): no random draw then.

    A NamedTuple rather than a frozen dataclass: equally immutable, and built per generated
    token, where a frozen dataclass's __init__ costs ~3 µs (5% of a step) on this CPU.
    """

    support: npt.NDArray[np.int64]
    logq: npt.NDArray[np.float64]
    q: npt.NDArray[np.float64]
    greedy_token: int | None
    alpha: float | None
    reason: Reason
    js: float
    overlap_count: int
    overlap_mass: float
    kl_gap: float
    chernoff: float
    filled_mass: float
