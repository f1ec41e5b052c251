"""Every read-out of a run of `StepResult`s: the API's summary, the batch job's richer summary
and the per-token columns. One module, so the HTTP responses, the batch records, the progress
bar and the report count the same things the same way.

Definitions (docs/ALGORITHM.md §5-6, §8): `alpha_mean` is the mean α over the steps that have
one (`single_token` steps have none); `fallback_rate` is the share of steps whose reason is
"unstable" (the stability check sent the step to the teacher, rule 3).

Speculative rounds (§8): a token's `draft` is null (a token-by-token step), "accepted" (a
drafted token kept), "resampled" (drawn from the residual after a draft was rejected: it ends
its round) or "bonus" (drawn from q after every draft of the round was kept: it ends its
round). `acceptance_rate` = accepted / (accepted + resampled), null when no draft was judged;
`tokens_per_round` = tokens made in rounds / rounds (a round that ends at a stop ends on an
"accepted" token), null without rounds; `requests_per_token` = the upstream requests this
choice needed per token: 2 per token-by-token step (one per upstream), and per round its draft
plus one scorer view per token (scorer views asked ahead and cancelled by a rejection are not
counted). Requests that several choices share through probe coalescing (app/probes.py) count
once for each: the gateway's own request counter
(`dual_vllm_upstream_request_duration_seconds_count`) gives the shared figure.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from app.sampling.types import (
    DRAFT_ACCEPTED,
    DRAFT_BONUS,
    DRAFT_NAMES,
    DRAFT_NONE,
    DRAFT_RESAMPLED,
    StepResult,
)

# The per-token columns of the API's `diagnostics` object, in its order (StepResult fields).
API_COLUMNS: tuple[str, ...] = (
    "token_ids",
    "alpha",
    "reason",
    "js",
    "overlap_mass",
    "overlap_count",
    "kl_gap",
    "chernoff",
    "filled_mass",
    "draft",
    "uncertain_mass",
    "base_logprob",
    "teacher_logprob",
    "base_logprob_exact",
    "teacher_logprob_exact",
    "certified",
    "refetches",
)


def summary(steps: Sequence[StepResult]) -> dict[str, float | int | None]:
    """The API's `diagnostics.summary`: alpha_mean (None if no step has an α), fallback_rate,
    the number of tokens, and the speculative rounds' figures (module docstring)."""
    alphas = [s.alpha for s in steps if s.alpha is not None]
    unstable = sum(1 for s in steps if s.reason == "unstable")
    drafts = Counter(s.draft for s in steps)
    judged = drafts[DRAFT_ACCEPTED] + drafts[DRAFT_RESAMPLED]
    rounds = drafts[DRAFT_RESAMPLED] + drafts[DRAFT_BONUS]
    if steps and steps[-1].draft == DRAFT_ACCEPTED:  # the last round ended at a stop
        rounds += 1
    in_rounds = len(steps) - drafts[DRAFT_NONE]
    return {
        "alpha_mean": math.fsum(alphas) / len(alphas) if alphas else None,
        "fallback_rate": unstable / len(steps) if steps else 0.0,
        "tokens": len(steps),
        "acceptance_rate": drafts[DRAFT_ACCEPTED] / judged if judged else None,
        "tokens_per_round": in_rounds / rounds if rounds else None,
        "requests_per_token": (2 * drafts[DRAFT_NONE] + rounds + in_rounds) / len(steps)
        if steps
        else None,
    }


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def sample_summary(steps: Sequence[StepResult]) -> dict[str, Any]:
    """A batch record's summary: `summary()` plus the count of each α rule and a few means."""
    solved_gaps = [s.kl_gap for s in steps if s.reason == "solved"]
    result: dict[str, Any] = dict(summary(steps))
    result.update(
        reasons=dict(Counter(s.reason for s in steps)),
        js_mean=_mean([s.js for s in steps]),
        overlap_mass_mean=_mean([s.overlap_mass for s in steps]),
        chernoff_mean=_mean([s.chernoff for s in steps]),
        kl_gap_max=max(solved_gaps) if solved_gaps else None,
        logprob_sum=math.fsum(s.logprob for s in steps),
    )
    return result


def token_columns(steps: Sequence[StepResult]) -> dict[str, list[Any]]:
    """Per-token values, column-wise, with the API's names (`token_ids` for the ids) plus the
    batch record's extra `logprob` and `support_size`; raw floats (non-finite kept)."""
    return {
        "token_ids": [s.token_id for s in steps],
        "logprob": [s.logprob for s in steps],
        "alpha": [s.alpha for s in steps],
        "reason": [s.reason for s in steps],
        "js": [s.js for s in steps],
        "overlap_mass": [s.overlap_mass for s in steps],
        "overlap_count": [s.overlap_count for s in steps],
        "kl_gap": [s.kl_gap for s in steps],
        "chernoff": [s.chernoff for s in steps],
        "support_size": [s.support_size for s in steps],
        "filled_mass": [s.filled_mass for s in steps],
        "draft": [DRAFT_NAMES[s.draft] for s in steps],
        "uncertain_mass": [s.uncertain_mass for s in steps],
        "base_logprob": [s.base_logprob for s in steps],
        "teacher_logprob": [s.teacher_logprob for s in steps],
        "base_logprob_exact": [s.base_exact for s in steps],
        "teacher_logprob_exact": [s.teacher_exact for s in steps],
        "certified": [s.certified for s in steps],
        "refetches": [s.refetches for s in steps],
    }
