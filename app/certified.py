"""Certified support in the engine (docs/ALGORITHM.md §9): the per-token read-outs and, when a
request sets `max_uncertain_mass`, fetching more before a step samples.

`uncertain_mass` (app/sampling/certify.py) bounds TV(q, q*), q* being the mixture of the two
full distributions. When it exceeds the request's tolerance, `Refinement.more` asks for more,
cheapest first, and the step (app/rounds.py `plain_step`) recomputes q and the bound after each
answer:

1. the exact logprobs of the ids of S that a model did not return (vLLM's `logprob_token_ids`,
   `UpstreamClient.token_logprobs`): afterwards no value inside S is a fill;
2. else the largest K both upstreams allow (the smaller of their --max-logprobs, read at
   start-up, capped at REFETCH_MAX_K), in one go: more known mass, a smaller tail outside S, a
   nucleus inside the known teacher mass; then 1. again for the new union. (Growing K step by
   step cost a round trip per step: a first fidelity run with ×4 steps made ~3.5 fetches per
   refetched step.)

It stops when the bound is within the tolerance or nothing more can be fetched; the token then
says which (`StepResult.certified`). Views grow by merging: a fetched value is exact, and the
top-K part keeps its meaning through `requested_k` (the cap on an unreturned id is the K-th
largest value, not the smallest known one).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from app.pair import UpstreamPair, to_topk
from app.plan import Plan
from app.sampling.certify import model_logprob, uncertain_mass
from app.sampling.topk import CLAMP_LOGPROB
from app.sampling.types import Mixture, StepResult, TopK
from app.tasks import both

REFETCH_MAX_K = 8192  # never ask for more (JSON of ~45 KB per 1024 entries)
MAX_IDS = 512  # exact values asked of one model in one fetch (4 requests of 128)
MAX_FETCHES = 6  # fetches one step may make


def readouts(
    result: StepResult,
    base: TopK,
    teacher: TopK,
    mixture: Mixture,
    plan: Plan,
    *,
    k: int | None = None,
    bound: float | None = None,
) -> StepResult:
    """The token's §9 read-outs when the request reads diagnostics or sets a tolerance:
    uncertain_mass and each model's raw logprob of the token (exact, or a bound when the
    model did not return it). `k`: the top-K size of the views (default the plan's)."""
    params = plan.params
    if not params.diagnostics and params.max_uncertain_mass is None:
        return result
    k = plan.k if k is None else k
    y = result.token_id
    base_lp, base_exact = model_logprob(base, y, requested_k=k)
    teacher_lp, teacher_exact = model_logprob(teacher, y, requested_k=k)
    if bound is None:
        bound = uncertain_mass(base, teacher, mixture, params.mixing, requested_k=k)
    return result._replace(
        uncertain_mass=bound,
        base_logprob=base_lp,
        teacher_logprob=teacher_lp,
        base_exact=base_exact,
        teacher_exact=teacher_exact,
        certified=None if params.max_uncertain_mass is None else bound <= params.max_uncertain_mass,
    )


def merged(view: TopK, extra: Mapping[int, float]) -> TopK:
    """`view` with more exact values (ids it already has keep their value)."""
    known = set(view.ids.tolist())
    new = [(i, lp) for i, lp in extra.items() if i not in known]
    if not new:
        return view
    ids = np.concatenate((view.ids, np.array([i for i, _ in new], dtype=np.int64)))
    logprobs = np.concatenate((view.logprobs, np.array([lp for _, lp in new], dtype=np.float64)))
    return TopK(ids=ids, logprobs=np.maximum(logprobs, CLAMP_LOGPROB))


class Refinement:
    """One step's fetches of more values (see the module docstring): `more` returns larger
    views, `bound` the step's bound for views of the current K."""

    def __init__(
        self,
        pair: UpstreamPair,
        plan: Plan,
        base_ctx: list[int],
        teacher_ctx: list[int],
        affinity: int,
    ) -> None:
        self.pair = pair
        self.plan = plan
        self.base_ctx = base_ctx
        self.teacher_ctx = teacher_ctx
        self.affinity = affinity
        limits = [pair.models[role].max_logprobs for role in ("base", "teacher")]
        known = [limit for limit in limits if limit is not None]
        self.max_k = min([REFETCH_MAX_K, *known]) if len(known) == 2 else plan.k
        self.k = plan.k
        self.fetches = 0

    def bound(self, base: TopK, teacher: TopK, mixture: Mixture) -> float:
        return uncertain_mass(base, teacher, mixture, self.plan.params.mixing, requested_k=self.k)

    async def more(self, base: TopK, teacher: TopK, mixture: Mixture) -> tuple[TopK, TopK] | None:
        """Larger views of this step, or None when nothing more can be fetched."""
        if self.fetches >= MAX_FETCHES:
            return None
        # The ids of S a model did not return, those q holds most first (their fills carry
        # the uncertain mass), at most MAX_IDS a fetch: S can hold thousands after a large K.
        order = mixture.support[np.argsort(-mixture.q, kind="stable")].tolist()
        known_b, known_t = set(base.ids.tolist()), set(teacher.ids.tolist())
        missing_b = [i for i in order if i not in known_b][:MAX_IDS]
        missing_t = [i for i in order if i not in known_t][:MAX_IDS]
        if missing_b or missing_t:
            extra_b, extra_t = await both(
                self._ids("base", self.base_ctx, missing_b),
                self._ids("teacher", self.teacher_ctx, missing_t),
            )
            self.fetches += 1
            return merged(base, extra_b), merged(teacher, extra_t)
        if self.k >= self.max_k:
            return None
        self.k = self.max_k
        wider_b, wider_t = await self.pair.probe(
            self.base_ctx, self.teacher_ctx, self.k, self.affinity
        )
        self.fetches += 1
        # The wider top-K first (its K-th value is the cap), then what was fetched before.
        extra_b = dict(zip(base.ids.tolist(), base.logprobs.tolist(), strict=True))
        extra_t = dict(zip(teacher.ids.tolist(), teacher.logprobs.tolist(), strict=True))
        return merged(wider_b, extra_b), merged(wider_t, extra_t)

    async def _ids(self, role: str, ctx: list[int], ids: list[int]) -> dict[int, float]:
        if not ids:
            return {}
        client = self.pair.base if role == "base" else self.pair.teacher
        values = await client.token_logprobs(ctx, ids, affinity=self.affinity)
        to_topk(values, role)  # the same checks as any view (502 on NaN, ...)
        return values
