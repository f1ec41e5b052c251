"""Certified support (issue 13): how far the sampled q is from the full-vocabulary q*, and the cost.

On the real CPU pair, started with the whole vocabulary available to `logprobs`
(`dual-vllm local start --max-logprobs -1`), each mode generates the same prompts and seeds
through the library's `Coordinator` (one sequence at a time, default mixing options, T = 1):

    k20        plain, K = 20 (the reference for the cost columns)
    k100       plain, K = 100
    m0.1       K = 20 + max_uncertain_mass 0.1 (fetch more when a step's bound exceeds it)
    m0.02      K = 20 + max_uncertain_mass 0.02
    m0.005     K = 20 + max_uncertain_mass 0.005

Cost, counted while generating only: HTTP requests and bytes (request + response bodies) per
token, seen by a counting wrapper around the upstream transport; upstream time per token (the
engine's step durations, from its observer: probes, fetches and the math); tokens/s (wall).

Fidelity, afterwards: every generated token's context (prompt + the ids before it) is asked of
both servers again with `logprobs` = the whole vocabulary (raw httpx, not counted above), q* =
`app.sampling.mix` of the two full views (no fills; the request's MixConfig; first_token for
the first token), and TV(q, q*) = ½ Σ |q − q*| over the vocabulary, q being the step's own
`support`/`logq`. Reported: TV mean/median/p90/max, how often the token's `uncertain_mass`
(docs/ALGORITHM.md §9, a proven upper bound on that TV) is ≥ TV, the mean bound, and the share
of steps that fetched more, and the tokens the engine could not certify (`certified` False).
The refetch is told the upstreams allow `--refetch-limit` logprobs (default 1024, what a plain
`dual-vllm local start` serves), although these servers allow the whole vocabulary.

    dual-vllm local start --max-logprobs -1
    PYTHONPATH=. .venv/bin/python bench/fidelity.py [--tokens 24] [--seeds 1 2] [--prompts 4]
        [--modes k20 k100 m0.1 m0.02 m0.005] [--refetch-limit 1024]

Prints a table and writes results/fidelity.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from httpx_aiohttp import AiohttpTransport

from app.coordinator import ChatMessage, Coordinator, DualPrompt, GenerationParams
from app.generation import Completion
from app.localvllm.servers import MAX_LOGPROBS
from app.localvllm.setup import Layout
from app.pair import to_topk
from app.sampling import mix
from app.sampling.types import MixConfig, StepResult
from app.settings import Settings
from bench.throughput import commit

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 49152  # SmolLM2's; checked against the servers' --max-logprobs at start
TOKEN_ID = "token_id:"
BOUND_SLACK = 1e-4  # float32 logprobs: a TV above the bound by less is rounding, not a violation

PROMPTS = [
    "Explain in detail how photosynthesis works, step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "A train travels 120 km in 1.5 hours. What is its average speed? Show your reasoning.",
    "List five tips for learning a new language and say why each one helps.",
    "What are the main differences between a cat and a dog as pets?",
]


@dataclass(frozen=True)
class Mode:
    name: str
    k: int
    max_uncertain_mass: float | None


MODES = {
    "k20": Mode("k20", 20, None),
    "k100": Mode("k100", 100, None),
    "m0.1": Mode("m0.1", 20, 0.1),
    "m0.02": Mode("m0.02", 20, 0.02),
    "m0.005": Mode("m0.005", 20, 0.005),
}


# --- cost: a counting transport and an observer ----------------------------------------------


@dataclass
class Counts:
    requests: int = 0
    sent: int = 0
    received: int = 0


class CountingStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, counts: Counts) -> None:
        self.inner = inner
        self.counts = counts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.counts.received += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class CountingTransport(httpx.AsyncBaseTransport):
    """Every upstream HTTP request of the coordinator (both clients share it): how many, and
    the bytes of the request and response bodies."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.counts = Counts()
        self.closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        counts = self.counts
        counts.requests += 1
        counts.sent += len(body)
        response = await self.inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=CountingStream(response.stream, counts),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        if not self.closed:  # the base and teacher clients both close it
            self.closed = True
            await self.inner.aclose()


class StepTimes:
    """The engine's observer: step durations (upstream probes + fetches + math)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self.calls = 0

    def reset(self) -> None:
        self.seconds, self.steps, self.calls = 0.0, 0, 0

    def upstream_call(self, upstream: str, seconds: float, error: str | None) -> None:
        self.calls += 1

    def step(self, result: StepResult, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1


# --- generation ------------------------------------------------------------------------------


@dataclass
class Run:
    mode: Mode
    prompt_index: int
    seed: int
    prompt: list[int]
    completion: Completion
    tv: list[float] = field(default_factory=list)


@dataclass
class Tally:
    """One mode's cost, summed over its sequences."""

    tokens: int = 0
    wall: float = 0.0
    step_seconds: float = 0.0
    requests: int = 0
    sent: int = 0
    received: int = 0


def params_of(mode: Mode, tokens: int, seed: int) -> GenerationParams:
    return GenerationParams(
        max_tokens=tokens,
        seed=seed,
        top_k_upstream=mode.k,
        mixing=MixConfig(),  # defaults: trust region 0.95, first-token forcing, stability check
        max_uncertain_mass=mode.max_uncertain_mass,
        diagnostics=True,
    )


async def generate(
    coord: Coordinator,
    transport: CountingTransport,
    observer: StepTimes,
    modes: list[Mode],
    prompts: list[list[int]],
    seeds: list[int],
    tokens: int,
) -> tuple[list[Run], dict[str, Tally]]:
    """Every (prompt, seed) through every mode, one sequence at a time; the modes take turns
    (in a rotating order) so a change in the machine's load reaches them all alike."""
    runs: list[Run] = []
    tallies = {mode.name: Tally() for mode in modes}
    turn = 0
    for p, ids in enumerate(prompts):
        for seed in seeds:
            for j in range(len(modes)):
                mode = modes[(turn + j) % len(modes)]
                transport.counts = Counts()
                observer.reset()
                started = time.perf_counter()
                [completion] = await coord.generate(
                    [DualPrompt(teacher=ids, base=ids)], params_of(mode, tokens, seed)
                )
                t = tallies[mode.name]
                t.wall += time.perf_counter() - started
                t.tokens += len(completion.token_ids)
                t.step_seconds += observer.seconds
                t.requests += transport.counts.requests
                t.sent += transport.counts.sent
                t.received += transport.counts.received
                runs.append(Run(mode, p, seed, ids, completion))
            turn += 1
    return runs, tallies


def cost(tally: Tally, runs: list[Run]) -> dict[str, Any]:
    n = tally.tokens
    steps = [s for r in runs for s in r.completion.steps]
    refetches = [getattr(s, "refetches", 0) or 0 for s in steps]
    return {
        "tokens": n,
        "wall_s": round(tally.wall, 3),
        "tokens_per_s": round(n / tally.wall, 3),
        "upstream_ms_per_token": round(1000 * tally.step_seconds / n, 2),
        "requests_per_token": round(tally.requests / n, 3),
        "kb_per_token": round((tally.sent + tally.received) / n / 1000, 2),
        "kb_sent_per_token": round(tally.sent / n / 1000, 2),
        "kb_received_per_token": round(tally.received / n / 1000, 2),
        "refetched_steps": sum(r > 0 for r in refetches),
        "refetches": sum(refetches),
        "uncertified_steps": sum(getattr(s, "certified", None) is False for s in steps),
    }


def tokens_of(runs: list[Run]) -> list[dict[str, Any]]:
    """Per token: where it is, its TV, bound, reason, fetches (results/fidelity.json)."""
    return [
        {
            "prompt": r.prompt_index,
            "seed": r.seed,
            "i": i,
            "token": s.token_id,
            "tv": round(r.tv[i], 6),
            "bound": None if s.uncertain_mass is None else round(s.uncertain_mass, 6),
            "reason": s.reason,
            "support": int(np.isfinite(s.logq).sum()),
            "refetches": getattr(s, "refetches", None),
            "certified": getattr(s, "certified", None),
        }
        for r in runs
        for i, s in enumerate(r.completion.steps)
    ]


def _fields(params: GenerationParams) -> dict[str, Any]:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


# --- ground truth ----------------------------------------------------------------------------


async def full_view(client: httpx.AsyncClient, url: str, model: str, ctx: list[int]) -> Any:
    body = {
        "model": model,
        "prompt": ctx,
        "max_tokens": 1,
        "logprobs": VOCAB,
        "temperature": 0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "return_tokens_as_token_ids": True,
    }
    for attempt in range(4):
        response = await client.post(
            url + "/v1/completions",
            content=orjson.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        if 400 <= response.status_code < 500:
            raise RuntimeError(f"{url} refused the full-vocabulary request: {response.text[:300]}")
        if response.status_code == 200:
            top = orjson.loads(response.content)["choices"][0]["logprobs"]["top_logprobs"][0]
            mapping = {int(key.removeprefix(TOKEN_ID)): float(lp) for key, lp in top.items()}
            if len(mapping) >= VOCAB:  # vLLM's batch bug answers {sampled, 0: -9999}: ask again
                return to_topk(mapping, url)
        await asyncio.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"{url} did not return the whole vocabulary for a context of {len(ctx)}")


def dense(ids: Any, probs: Any) -> Any:
    out = np.zeros(VOCAB, dtype=np.float64)
    out[np.asarray(ids, dtype=np.int64)] = probs
    return out


async def ground_truth(
    runs: list[Run], base_url: str, teacher_url: str, models: tuple[str, str], concurrency: int
) -> float:
    """TV(q, q*) for every token of every run; returns the seconds it took."""
    started = time.perf_counter()
    # One fetch per distinct context (modes share the first token's context, and more while
    # they draw the same tokens).
    users: dict[tuple[int, ...], list[tuple[Run, int]]] = {}
    for run in runs:
        run.tv = [0.0] * len(run.completion.token_ids)
        for i in range(len(run.completion.token_ids)):
            ctx = (*run.prompt, *run.completion.token_ids[:i])
            users.setdefault(ctx, []).append((run, i))
    limit = asyncio.Semaphore(concurrency)
    done = 0
    timeout = httpx.Timeout(300.0)
    async with httpx.AsyncClient(timeout=timeout, transport=AiohttpTransport()) as client:

        async def one(ctx: tuple[int, ...], uses: list[tuple[Run, int]]) -> None:
            nonlocal done
            async with limit:
                base, teacher = await asyncio.gather(
                    full_view(client, base_url, models[0], list(ctx)),
                    full_view(client, teacher_url, models[1], list(ctx)),
                )
            stars: dict[tuple[MixConfig, bool], Any] = {}
            for run, i in uses:
                step = run.completion.steps[i]
                config = MixConfig()  # the requests' mixing options (bench defaults)
                key = (config, i == 0)
                if key not in stars:
                    star = mix(base, teacher, config, first_token=i == 0)
                    stars[key] = dense(star.support, star.q)
                q = dense(step.support, np.exp(step.logq))
                run.tv[i] = 0.5 * float(np.abs(q - stars[key]).sum())
            done += 1
            if done % 50 == 0:
                sys.stderr.write(f"  ground truth: {done}/{len(users)} contexts\n")

        await asyncio.gather(*(one(ctx, uses) for ctx, uses in users.items()))
    return time.perf_counter() - started


# --- report ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def fidelity(runs: list[Run]) -> dict[str, Any]:
    tv = [t for r in runs for t in r.tv]
    # Tokens the engine could not bring within the tolerance (`certified` False: the
    # upstreams' limit was reached) are reported as such; the rest must be within it.
    flags = [getattr(s, "certified", None) for r in runs for s in r.completion.steps]
    certified = [t for t, flag in zip(tv, flags, strict=True) if flag is not False]
    bounds = [s.uncertain_mass for r in runs for s in r.completion.steps]
    pairs = [(b, t) for b, t in zip(bounds, tv, strict=True) if b is not None]
    held = sum(b >= t for b, t in pairs)
    violations = [
        {"bound": b, "tv": t} for b, t in pairs if t > b + BOUND_SLACK
    ]  # beyond float32 rounding
    return {
        "tv_mean": statistics.fmean(tv),
        "tv_median": statistics.median(tv),
        "tv_p90": percentile(tv, 90),
        "tv_max": max(tv),
        "tokens_tv_le_0.02": sum(t <= 0.02 for t in tv) / len(tv),
        "uncertified_share": 1 - len(certified) / len(tv),
        "tv_p90_certified": percentile(certified, 90),
        "tv_max_certified": max(certified, default=float("nan")),
        "bound_mean": statistics.fmean(b for b, _ in pairs) if pairs else None,
        "bound_holds_share": held / len(pairs) if pairs else None,
        "bound_holds_within_slack_share": 1 - len(violations) / len(pairs) if pairs else None,
        "max_tv_minus_bound": max(t - b for b, t in pairs) if pairs else None,
        "violations": violations[:20],
        "violation_count": len(violations),
    }


COLUMNS = {
    "mode": 7,
    "tokens": 6,
    "TV mean": 7,
    "median": 7,
    "p90": 7,
    "max": 7,
    "bound>=TV": 9,
    "bound": 7,
    "refetch": 7,
    "uncert.": 7,
    "max cert.": 9,
    "req/tok": 7,
    "KB/tok": 7,
    "ms/tok": 7,
    "x k20": 6,
    "tok/s": 6,
}


def row(result: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    f, c = result["fidelity"], result["cost"]
    ratio = c["upstream_ms_per_token"] / reference["cost"]["upstream_ms_per_token"]
    bound = "-" if f["bound_mean"] is None else f"{f['bound_mean']:.4f}"
    share = f["bound_holds_within_slack_share"]
    holds = "-" if share is None else f"{100 * share:.1f}%"
    return [
        result["mode"],
        str(c["tokens"]),
        f"{f['tv_mean']:.4f}",
        f"{f['tv_median']:.4f}",
        f"{f['tv_p90']:.4f}",
        f"{f['tv_max']:.4f}",
        holds,
        bound,
        f"{100 * c['refetched_steps'] / c['tokens']:.0f}%",
        "-" if plain(result) else f"{100 * f['uncertified_share']:.1f}%",
        "-" if plain(result) else f"{f['tv_max_certified']:.4f}",
        f"{c['requests_per_token']:.2f}",
        f"{c['kb_per_token']:.1f}",
        f"{c['upstream_ms_per_token']:.0f}",
        f"{ratio:.2f}",
        f"{c['tokens_per_s']:.1f}",
    ]


def plain(result: dict[str, Any]) -> bool:
    """A plain mode (no tolerance, so no certified flag)."""
    return result["max_uncertain_mass"] is None


def table(results: list[dict[str, Any]]) -> str:
    reference = next((r for r in results if r["mode"] == "k20"), results[0])
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(row(r, reference)) + " |" for r in results]
    return "\n".join(lines) + "\n"


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["mode"]: r for r in results}
    out: list[dict[str, Any]] = []
    if "m0.02" in by:
        f, c = by["m0.02"]["fidelity"], by["m0.02"]["cost"]
        out.append({"target": "m0.02: every token's TV <= 0.02", "measured": f["tv_max"]})
        out[-1]["met"] = f["tv_max"] <= 0.02
        out.append({"target": "m0.02: TV p90 <= 0.01", "measured": f["tv_p90"]})
        out[-1]["met"] = f["tv_p90"] <= 0.01
        if "k20" in by:
            ratio = c["upstream_ms_per_token"] / by["k20"]["cost"]["upstream_ms_per_token"]
            out.append({"target": "m0.02: upstream time/token <= 1.5x k20", "measured": ratio})
            out[-1]["met"] = ratio <= 1.5
    for r in results:
        f = r["fidelity"]
        if f["bound_holds_share"] is not None:
            out.append(
                {
                    "target": f"{r['mode']}: uncertain_mass >= TV on every token",
                    "measured": f["bound_holds_within_slack_share"],
                    "met": f["violation_count"] == 0,
                }
            )
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    layout = Layout.from_env()
    settings = Settings(
        base_url=[args.base_url],
        teacher_url=[args.teacher_url],
        tokenizer=str(layout.teacher),
    )
    transport = CountingTransport(AiohttpTransport())
    observer = StepTimes()
    modes = [MODES[name] for name in args.modes]
    async with Coordinator(settings, observer=observer, transport=transport) as coord:
        limits = {role: coord.models[role].max_logprobs for role in ("base", "teacher")}
        if any(limit is None or limit < VOCAB for limit in limits.values()):
            raise SystemExit(
                f"the servers' --max-logprobs are {limits}: full-vocabulary ground truth needs "
                f"{VOCAB}; restart them with `dual-vllm local stop && dual-vllm local start "
                "--max-logprobs -1`"
            )
        models = (coord.models["base"].name, coord.models["teacher"].name)
        if args.refetch_limit > 0:
            # What the engine's refetch may ask (ModelInfo.max_logprobs, read at start-up):
            # as against servers with that --max-logprobs, while the ground truth below asks
            # the same servers for the whole vocabulary.
            for role in ("base", "teacher"):
                info = coord.pair.models[role]
                coord.pair.models[role] = replace(info, max_logprobs=args.refetch_limit)
        prompts: list[list[int]] = []
        for text in PROMPTS[: args.prompts]:
            prompt = await coord.chat_prompt([ChatMessage("user", text)])
            prompts.append(prompt.teacher)  # the same ids for both: contexts = prompt + output
        # Untimed warm-up: numba, connections, every prompt in the servers' prefix caches.
        for k in sorted({mode.k for mode in modes}):
            warm = GenerationParams(max_tokens=2, seed=0, top_k_upstream=k, diagnostics=True)
            await coord.generate([DualPrompt(teacher=ids, base=ids) for ids in prompts], warm)
        runs, tallies = await generate(
            coord, transport, observer, modes, prompts, args.seeds, args.tokens
        )
    sys.stderr.write("ground truth (not in the cost)...\n")
    gt_seconds = await ground_truth(
        runs, args.base_url, args.teacher_url, models, args.truth_concurrency
    )
    results = []
    for mode in modes:
        mine = [r for r in runs if r.mode == mode]
        results.append(
            {
                "mode": mode.name,
                "k": mode.k,
                "max_uncertain_mass": mode.max_uncertain_mass,
                "cost": cost(tallies[mode.name], mine),
                "fidelity": fidelity(mine),
                "texts": [r.completion.text for r in mine],
                "per_token": tokens_of(mine),
            }
        )
    return {"results": results, "ground_truth_seconds": round(gt_seconds, 1)}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=24, help="generated tokens per sequence")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompts", type=int, default=4, help=f"at most {len(PROMPTS)}")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument(
        "--refetch-limit",
        type=int,
        default=MAX_LOGPROBS,
        help="the upstreams' --max-logprobs as the engine's refetch sees it "
        f"(default {MAX_LOGPROBS}, what `dual-vllm local start` serves; 0: the servers' own)",
    )
    parser.add_argument("--truth-concurrency", type=int, default=2, help="contexts in flight")
    parser.add_argument("--base-url", default="http://127.0.0.1:8101")
    parser.add_argument("--teacher-url", default="http://127.0.0.1:8102")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "fidelity.json")
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in 1..{len(PROMPTS)}")
    result: dict[str, Any] = {
        "commit": commit(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "mixing": "defaults (trust region 0.95, first-token forcing, stability check), T = 1",
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    started = time.perf_counter()
    result.update(asyncio.run(main(args)))
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    result["targets"] = targets(result["results"])
    sys.stdout.write("\n" + table(result["results"]) + "\n")
    for t in result["targets"]:
        met = "yes" if t["met"] else "NO"
        sys.stdout.write(f"{t['target']:<48} {t['measured']:.4f}  {met}\n")
    before, after = result["load_average_before"], result["load_average_after"]
    sys.stdout.write(
        f"\nload average before {before}, after {after}; commit {result['commit']}; "
        f"{result['total_seconds']:.0f} s (ground truth {result['ground_truth_seconds']:.0f} s)\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    cli()
