"""Seeded random and adversarial top-K pairs, shaped as vLLM returns them (issue 3's list:
near-identical, disjoint supports, one huge logit, -9999 entries, K+1 entries, K from 1 to
100). Shared by the solver property test and the kernel-vs-numpy comparison."""

from __future__ import annotations

import math

import numpy as np

from app.sampling import TopK

KINDS = ("random", "near_identical", "disjoint", "huge_logit", "clamped", "k_plus_one")


def adversarial_pair(rng: np.random.Generator, kind: str) -> tuple[TopK, TopK]:
    """(base, teacher) top-K views of two full distributions over a 50-5000 token vocabulary."""
    vocab = int(rng.choice([50, 500, 5000]))
    k = min(int(rng.choice([1, 2, 3, 5, 20, 20, 50, 100])), vocab)
    base = rng.normal(0.0, rng.uniform(0.3, 5.0), vocab)
    if kind == "near_identical":
        teacher = base + rng.normal(0.0, 10.0 ** rng.uniform(-10, -5), vocab)
    elif kind == "disjoint":
        teacher = rng.permutation(base)
    else:
        teacher = base + rng.normal(0.0, rng.uniform(0.1, 3.0), vocab)
    if kind == "huge_logit":
        base[rng.integers(vocab)] += 60.0
        teacher[rng.integers(vocab)] += rng.uniform(5.0, 60.0)
    views = []
    # "disjoint": the teacher's ids are shifted past the vocabulary, so the supports share none.
    for offset, logits in ((0, base), (10 * vocab if kind == "disjoint" else 0, teacher)):
        logp = logits - (logits.max() + math.log(float(np.exp(logits - logits.max()).sum())))
        top = list(np.argsort(-logp, kind="stable")[:k])
        if kind == "k_plus_one" and k < vocab:
            extra = int(rng.integers(vocab))
            if extra not in top:
                top.insert(0, extra)  # vLLM puts its sampled token first
        values = logp[top]
        if kind == "clamped":
            values[-max(1, k // 3) :] = -9999.0
        views.append(TopK(ids=np.array(top, dtype=np.int64) + offset, logprobs=values))
    return views[0], views[1]


def as_mapping(view: TopK) -> dict[int, float]:
    """The id -> logprob mapping of a view (the slow reference's input)."""
    return dict(zip(view.ids.tolist(), view.logprobs.tolist(), strict=True))
