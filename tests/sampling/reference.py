"""A slow, direct reading of docs/ALGORITHM.md §1–5 to test app.sampling against.

Written independently of the fast code: id-keyed dicts, a textbook logsumexp, a lexsort for the
nucleus, KL(q‖p_b) − KL(q‖p_t) computed from its definition, and plain bisection for α.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def logsumexp(x: FloatArray | list[float]) -> float:
    a = np.asarray(x, dtype=np.float64)
    top = float(a.max())
    return top + math.log(float(np.sum(np.exp(a - top))))


@dataclass
class Reference:
    support: list[int]
    lb: FloatArray  # tempered, normalized log p_b over all of S
    lt: FloatArray
    shared: list[bool]
    active: list[int]  # positions in S of the trust-region nucleus
    lb_active: FloatArray  # renormalized on the nucleus
    lt_active: FloatArray


def distributions(
    base: dict[int, float], teacher: dict[int, float], temperature: float, rho: float | None
) -> Reference:
    support = sorted(set(base) | set(teacher))
    rows = []
    for known in (base, teacher):
        logs = {y: max(v, -9999.0) for y, v in known.items()}
        missing = [y for y in support if y not in logs]
        if missing:
            probs = [math.exp(v) for v in logs.values()]
            # 1 − M without cancellation: M = e^top·(1 + Σ_{others} e^(lp − top))
            values = sorted(logs.values())
            top = values[-1]
            log_mass = top + math.log1p(math.fsum(math.exp(v - top) for v in values[:-1]))
            tail = max(-math.expm1(log_mass), 0.0)
            fill = max(min(min(probs), tail / len(missing)), 1e-10)
            for y in missing:
                logs[y] = math.log(fill)
        row = np.array([logs[y] for y in support]) / (1.0 if temperature == 0 else temperature)
        rows.append(row - logsumexp(row))
    lb, lt = rows
    active = list(range(len(support)))
    if rho is not None and rho < 1.0:
        pt = np.exp(lt)
        order = np.lexsort((np.array(support), -pt))  # by -p_t, then id
        cumulative = 0.0
        chosen = []
        for i in order:
            chosen.append(int(i))
            cumulative += pt[i]
            if cumulative >= rho * pt.sum():
                break
        active = sorted(chosen)
    lba, lta = lb[active], lt[active]
    return Reference(
        support=support,
        lb=lb,
        lt=lt,
        shared=[y in base and y in teacher for y in support],
        active=active,
        lb_active=lba - logsumexp(lba),
        lt_active=lta - logsumexp(lta),
    )


def log_q(lb: FloatArray, lt: FloatArray, alpha: float) -> FloatArray:
    x = (1.0 - alpha) * lb + alpha * lt
    return x - logsumexp(x)


def kl_difference(logq: FloatArray, lb: FloatArray, lt: FloatArray) -> float:
    """KL(q‖p_b) − KL(q‖p_t) from the definitions (terms with q = 0 vanish)."""
    q = np.exp(logq)
    live = q > 0
    kl_b = float(np.sum(q[live] * (logq[live] - lb[live])))
    kl_t = float(np.sum(q[live] * (logq[live] - lt[live])))
    return kl_b - kl_t


def bisect_alpha(lb: FloatArray, lt: FloatArray, width: float = 1e-12) -> tuple[float, float]:
    """The bracket [lo, hi] (hi − lo ≤ width) of the root of g by plain bisection."""
    lo, hi = 0.0, 1.0
    while hi - lo > width:
        mid = 0.5 * (lo + hi)
        if kl_difference(log_q(lb, lt, mid), lb, lt) < 0.0:
            lo = mid
        else:
            hi = mid
    return lo, hi


def variance_of_d(logq: FloatArray, lb: FloatArray, lt: FloatArray) -> float:
    q = np.exp(logq)
    d = lt - lb
    mean = float(q @ d)
    return float(q @ (d - mean) ** 2)
