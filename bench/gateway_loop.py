"""Tokens/s of the coordinator's loop against the real CPU vLLM pair vs the teacher alone.

Side by side in one run (the machine is shared and noisy, so only ratios taken together mean
much): for 1 and 4 concurrent sequences, the coordinator generating N tokens per sequence
(`generate`, and `stream` which also detokenizes after every token), and the teacher server
generating the same N tokens itself (one /v1/completions with max_tokens N per sequence).
EOS is ignored so every run produces exactly N tokens per sequence.

    .venv/bin/python bench/gateway_loop.py [--tokens 32] [--repeats 2] [--concurrency 1 4]

Prints a table and writes results/gateway_loop.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from app.coordinator import ChatMessage, Coordinator, DualPrompt, GenerationParams
from app.settings import Settings

PROMPT = [ChatMessage("user", "Tell me a long story about a lighthouse keeper.")]


async def coordinator_run(
    coord: Coordinator, prompt: DualPrompt, tokens: int, concurrency: int, stream: bool
) -> int:
    params = GenerationParams(max_tokens=tokens, n=concurrency, ignore_eos=True, seed=0)
    if stream:
        count = 0
        async for _ in coord.stream([prompt], params):
            count += 1
        return count - concurrency  # minus the finish events
    results = await coord.generate([prompt], params)
    return sum(r.completion_tokens for r in results)


async def teacher_run(
    client: httpx.AsyncClient, url: str, prompt: DualPrompt, tokens: int, concurrency: int
) -> int:
    async def one(seed: int) -> int:
        response = await client.post(
            f"{url}/v1/completions",
            json={
                "prompt": prompt.teacher,
                "max_tokens": tokens,
                "temperature": 1.0,
                "ignore_eos": True,
                "seed": seed,
            },
        )
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(i)) for i in range(concurrency)]
    return sum(t.result() for t in tasks)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(base_url=[args.base_url], teacher_url=[args.teacher_url])
    rows: list[dict[str, Any]] = []
    timeout = httpx.Timeout(300.0, connect=5.0)
    async with (
        Coordinator(settings) as coord,
        httpx.AsyncClient(timeout=timeout) as client,
    ):
        prompt = await coord.chat_prompt(PROMPT)
        # Warm-up: both servers' first requests are slow (docs/LOCAL_VLLM.md).
        await coordinator_run(coord, prompt, 4, 1, stream=False)
        await teacher_run(client, args.teacher_url, prompt, 4, 1)
        for concurrency in args.concurrency:
            modes = ["teacher alone", "coordinator generate", "coordinator stream"]
            seconds: dict[str, list[float]] = {m: [] for m in modes}
            produced: dict[str, int] = {}
            for _ in range(args.repeats):
                for mode in modes:
                    started = time.perf_counter()
                    if mode == "teacher alone":
                        n = await teacher_run(
                            client, args.teacher_url, prompt, args.tokens, concurrency
                        )
                    else:
                        n = await coordinator_run(
                            coord, prompt, args.tokens, concurrency, mode.endswith("stream")
                        )
                    seconds[mode].append(time.perf_counter() - started)
                    produced[mode] = n
            alone = args.tokens * concurrency / statistics.median(seconds["teacher alone"])
            for mode in modes:
                median = statistics.median(seconds[mode])
                rate = produced[mode] / median
                rows.append(
                    {
                        "concurrency": concurrency,
                        "mode": mode,
                        "tokens": produced[mode],
                        "seconds_median": round(median, 3),
                        "tokens_per_s": round(rate, 2),
                        "tokens_per_s_per_sequence": round(rate / concurrency, 2),
                        "vs_teacher_alone": round(rate / alone, 3),
                        "seconds_all": [round(s, 3) for s in seconds[mode]],
                    }
                )
    return {
        "tokens_per_sequence": args.tokens,
        "repeats": args.repeats,
        "top_k": settings.top_k,
        "machine": platform.platform(),
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'conc':>4}  {'mode':<22} {'tok/s':>7} {'tok/s/seq':>9} {'x alone':>7} {'s (median)':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['concurrency']:>4}  {r['mode']:<22} {r['tokens_per_s']:>7.2f} "
            f"{r['tokens_per_s_per_sequence']:>9.2f} {r['vs_teacher_alone']:>7.3f} "
            f"{r['seconds_median']:>10.2f}"
        )
    return "\n".join(lines) + "\n"


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base-url", default="http://127.0.0.1:8101")
    parser.add_argument("--teacher-url", default="http://127.0.0.1:8102")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", type=Path, default=Path("results/gateway_loop.json"))
    args = parser.parse_args()
    result = asyncio.run(main(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(table(result))
    sys.stdout.write(f"written to {args.out}\n")


if __name__ == "__main__":
    cli()
