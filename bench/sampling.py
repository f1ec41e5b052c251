"""Time per mixing step (issue 3): app.sampling.mix_step against a straightforward numpy step
that finds α by 20 bisection iterations (the old system's solver), on the same inputs.

    .venv/bin/python bench/sampling.py [--steps 200] [--repeats 5]

Inputs: synthetic next-token distributions over a 49 152-token vocabulary (SmolLM2's), the
base with Gaussian logits of random scale, the teacher = base + noise, each cut to its top K.
Times are CPU time of the calling thread (time.thread_time_ns): the median over all steps of
one run, and the lowest such median of --runs runs (ours and the baseline interleaved), so
other load on the shared machine inflates them less. Prints a table and
writes results/sampling.json. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.sampling import MixConfig, TopK, make_generators, mix_step, warm_up
from app.sampling.kernel import solve

FloatArray = npt.NDArray[np.float64]
VOCAB = 49152


def make_steps(k: int, steps: int, seed: int) -> list[tuple[TopK, TopK]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        base = rng.normal(0.0, rng.uniform(1.5, 4.0), VOCAB)
        teacher = base + rng.normal(0.0, rng.uniform(0.3, 1.5), VOCAB)
        pair = []
        for logits in (base, teacher):
            logp = logits - (logits.max() + math.log(float(np.exp(logits - logits.max()).sum())))
            top = np.argpartition(-logp, k)[:k]
            top = top[np.argsort(-logp[top])]
            pair.append(TopK(ids=top.astype(np.int64), logprobs=logp[top]))
        out.append((pair[0], pair[1]))
    return out


def baseline_step(
    base: TopK, teacher: TopK, config: MixConfig, rng: np.random.Generator
) -> tuple[int, float, float]:
    """docs/ALGORITHM.md §1–5 written the obvious way: probabilities, union1d/isin, powers, and
    α by 20 bisection iterations on KL(q‖p_b) − KL(q‖p_t). Returns (token, α, |g(α)|)."""
    support = np.union1d(base.ids, teacher.ids)
    probs = []
    for view in (base, teacher):
        known = np.exp(view.logprobs)
        missing = ~np.isin(support, view.ids)
        fill = max(min(known.min(), max(1.0 - known.sum(), 0.0) / max(missing.sum(), 1)), 1e-10)
        p = np.full(support.shape[0], fill)
        p[np.searchsorted(support, view.ids)] = known
        p = p ** (1.0 / config.temperature)
        probs.append(p / p.sum())
    pb, pt = probs
    m = 0.5 * (pb + pt)
    js = 0.5 * np.sum(pb * np.log(pb / m)) + 0.5 * np.sum(pt * np.log(pt / m))
    shared = np.isin(support, base.ids) & np.isin(support, teacher.ids)
    overlap = min(pb[shared].sum(), pt[shared].sum())
    unstable = js > config.js_threshold or overlap < config.overlap_threshold
    if config.trust_region_top_p is not None and config.trust_region_top_p < 1.0:
        order = np.argsort(-pt, kind="stable")
        count = int(np.searchsorted(np.cumsum(pt[order]), config.trust_region_top_p)) + 1
        keep = np.sort(order[:count])
        pb, pt = pb[keep] / pb[keep].sum(), pt[keep] / pt[keep].sum()

    def kl_gap(alpha: float) -> tuple[FloatArray, float]:
        q = pb ** (1.0 - alpha) * pt**alpha
        q = q / q.sum()
        return q, float(np.sum(q * np.log(q / pb)) - np.sum(q * np.log(q / pt)))

    if config.stability_check and unstable and config.auto_fallback:
        alpha = 1.0
    else:
        lo, hi = 0.0, 1.0
        for _ in range(20):
            mid = 0.5 * (lo + hi)
            if kl_gap(mid)[1] < 0.0:
                lo = mid
            else:
                hi = mid
        alpha = 0.5 * (lo + hi)
    q, g = kl_gap(alpha)
    token = int(rng.choice(q.shape[0], p=q))
    return token, alpha, abs(g)


def aligned(base: TopK, teacher: TopK) -> tuple[FloatArray, FloatArray]:
    """§1 at T = 1, no trust region: normalized log p_b, log p_t over the union."""
    support = np.union1d(base.ids, teacher.ids)
    logs = []
    for view in (base, teacher):
        known = np.exp(view.logprobs)
        missing = support.shape[0] - view.ids.shape[0]
        fill = max(min(known.min(), max(1.0 - known.sum(), 0.0) / max(missing, 1)), 1e-10)
        p = np.full(support.shape[0], fill)
        p[np.searchsorted(support, view.ids)] = known
        logs.append(np.log(p / p.sum()))
    return logs[0], logs[1]


def bisect20(lb: FloatArray, lt: FloatArray) -> float:
    """The baseline's α: 20 bisection iterations on KL(q‖p_b) − KL(q‖p_t)."""
    pb, pt = np.exp(lb), np.exp(lt)
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        q = pb ** (1.0 - mid) * pt**mid
        q = q / q.sum()
        if np.sum(q * np.log(q / pb)) - np.sum(q * np.log(q / pt)) < 0.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def time_solvers(steps: list[tuple[TopK, TopK]], repeats: int) -> tuple[list[float], list[float]]:
    """α alone on the same aligned inputs: the kernel's safeguarded Newton/Halley (warm-started
    from the previous step's α; building its input d = log p_t − log p_b and its q_α buffers
    included) vs bisect20."""
    inputs = [aligned(base, teacher) for base, teacher in steps]
    clock = time.thread_time_ns
    ours, theirs = [], []
    for _ in range(repeats):
        hint = -1.0  # no warm start for the first step
        for lb, lt in inputs:
            start = clock()
            d = lt - lb
            _, alpha, _, _, _ = solve(lb, d, hint, 0.0, np.empty_like(d), np.empty_like(d))
            ours.append((clock() - start) / 1e3)
            hint = alpha
            start = clock()
            bisect20(lb, lt)
            theirs.append((clock() - start) / 1e3)
    return ours, theirs


def time_ours(
    steps: list[tuple[TopK, TopK]], config: MixConfig, repeats: int
) -> tuple[list[float], list[float], dict[str, int]]:
    rng = make_generators(0, 1)[0]
    times, gaps = [], []
    reasons: dict[str, int] = {}
    clock = time.thread_time_ns  # CPU time of this thread: the machine is shared
    for _ in range(repeats):
        hint = None
        for base, teacher in steps:
            start = clock()
            result = mix_step(base, teacher, config, first_token=False, rng=rng, alpha_hint=hint)
            times.append((clock() - start) / 1e3)
            hint = result.alpha
            reasons[result.reason] = reasons.get(result.reason, 0) + 1
            if result.reason == "solved":
                gaps.append(result.kl_gap)
    return times, gaps, reasons


def time_baseline(
    steps: list[tuple[TopK, TopK]], config: MixConfig, repeats: int
) -> tuple[list[float], list[float]]:
    rng = make_generators(0, 1)[0]
    times, gaps = [], []
    clock = time.thread_time_ns  # CPU time of this thread: the machine is shared
    for _ in range(repeats):
        for base, teacher in steps:
            start = clock()
            _, alpha, gap = baseline_step(base, teacher, config, rng)
            times.append((clock() - start) / 1e3)
            if alpha != 1.0:
                gaps.append(gap)
    return times, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=7, help="report the best run's median")
    parser.add_argument("--out", type=Path, default=Path("results/sampling.json"))
    args = parser.parse_args()
    compile_seconds = warm_up()  # JIT (or numba's on-disk cache), outside the timings
    load_before = os.getloadavg()
    configs = {
        "defaults": MixConfig(),
        "always solve": MixConfig(trust_region_top_p=None, stability_check=False),
    }
    rows = []
    for k in (20, 100):
        steps = make_steps(k, args.steps, seed=k)
        for name, config in configs.items():
            ours_runs, base_runs = [], []
            for _ in range(args.runs):  # interleaved, so both see the same background load
                ours, our_gaps, reasons = time_ours(steps, config, args.repeats)
                base, base_gaps = time_baseline(steps, config, args.repeats)
                ours_runs.append(statistics.median(ours))
                base_runs.append(statistics.median(base))
            rows.append(
                {
                    "k": k,
                    "config": name,
                    "ours_median_us": min(ours_runs),
                    "baseline_median_us": min(base_runs),
                    "speedup": min(base_runs) / min(ours_runs),
                    "ours_run_medians_us": ours_runs,
                    "baseline_run_medians_us": base_runs,
                    "ours_max_abs_g": max(our_gaps, default=0.0),
                    "baseline_max_abs_g": max(base_gaps, default=0.0),
                    "solved_fraction": reasons.get("solved", 0) / len(ours),
                    "reasons": reasons,
                }
            )
    solver_rows = []
    for k in (20, 100):
        steps = make_steps(k, args.steps, seed=k)
        runs = [time_solvers(steps, args.repeats) for _ in range(args.runs)]
        ours_best = min(statistics.median(ours) for ours, _ in runs)
        theirs_best = min(statistics.median(theirs) for _, theirs in runs)
        solver_rows.append(
            {
                "k": k,
                "ours_median_us": ours_best,
                "bisect20_median_us": theirs_best,
                "speedup": theirs_best / ours_best,
            }
        )
    header = (
        f"{'K':>4} {'config':<13} {'ours µs':>9} {'bisect20 µs':>12} {'speedup':>8} "
        f"{'max |g| ours':>13} {'max |g| bisect20':>17} {'solved':>7}\n"
    )
    out = sys.stdout
    load_after = os.getloadavg()
    out.write(
        f"median CPU time per step ({args.steps} steps x {args.repeats} repeats; "
        f"best of {args.runs} runs; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs)\n"
    )
    out.write(f"warm_up (numba import + compile or cache load): {compile_seconds:.2f} s\n")
    out.write(header)
    for r in rows:
        out.write(
            f"{r['k']:>4} {r['config']:<13} {r['ours_median_us']:>9.1f} "
            f"{r['baseline_median_us']:>12.1f} {r['speedup']:>7.1f}x "
            f"{r['ours_max_abs_g']:>13.1e} {r['baseline_max_abs_g']:>17.1e} "
            f"{r['solved_fraction']:>7.0%}\n"
        )
    out.write("\nα alone (same aligned inputs, no trust region)\n")
    out.write(f"{'K':>4} {'ours µs':>9} {'bisect20 µs':>12} {'speedup':>8}\n")
    for row in solver_rows:
        out.write(
            f"{row['k']:>4} {row['ours_median_us']:>9.1f} {row['bisect20_median_us']:>12.1f} "
            f"{row['speedup']:>7.1f}x\n"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu": platform.processor(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "warm_up_seconds": compile_seconds,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "solver": solver_rows}, indent=2))
    out.write(f"wrote {args.out}\n")


if __name__ == "__main__":
    main()
