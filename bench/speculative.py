"""Speculative rounds on the real CPU pair (issue 12): plain mode, speculative rounds and the
teacher alone, side by side in one run, through the HTTP API.

For S in `--sequences`, `--repeats` times, in this order: S concurrent streaming
/v1/completions requests to the gateway token by token, the same with `mixing.speculative`
(`--k`, `--drafter`), and the teacher generating the same number of tokens alone (S concurrent
/v1/completions). Every gateway request has `ignore_eos`, a seed and `mixing.diagnostics`, so
the finish chunk's summary gives the acceptance and tokens per round; upstream requests per
token come from the gateway's own counter (every upstream call, after coalescing).

    PYTHONPATH=. .venv/bin/python bench/speculative.py [--sequences 1 4 8] [--tokens 48]
        [--repeats 2] [--k auto] [--drafter auto]

Needs the pair (`dual-vllm local start`, ports 8101/8102). Prints a table and the issue's
targets; writes results/speculative.json (with load averages, the commit and the parameters).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from app.localvllm.servers import is_healthy
from app.localvllm.setup import Layout
from bench.throughput import (
    ROOT,
    chat_ids,
    client,
    commit,
    gateway,
    print_row,
    stream_body,
    teacher_run,
    upstream_calls,
)

COLUMNS = {
    "sequences": "seqs",
    "mode": "mode      ",
    "tokens_per_s": "tok/s",
    "x_plain": "x plain",
    "x_teacher": "x teacher",
    "acceptance": "accept",
    "tokens_per_round": "tok/round",
    "upstream_requests_per_token": "req/tok",
    "failed": "failed",
}


async def stream(
    http: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any] | None, str | None]:
    """One streaming request: (completion tokens, the choice's diagnostics summary, error)."""
    tokens, summary, error = 0, None, None
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return 0, None, f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = str(event["error"])
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or []:
                found = (choice.get("diagnostics") or {}).get("summary")
                if found is not None:
                    summary = found
    return tokens, summary, error


async def gateway_batch(
    http: httpx.AsyncClient,
    url: str,
    prompt: list[int],
    tokens: int,
    sequences: int,
    speculative: dict[str, Any] | None,
) -> dict[str, Any]:
    def body(seed: int) -> dict[str, Any]:
        mixing = {"speculative": speculative, "diagnostics": True}
        return {**stream_body(prompt, tokens, seed), "mixing": mixing}

    calls = await upstream_calls(http, url)
    started = time.perf_counter()
    results = await asyncio.gather(*(stream(http, url, body(i)) for i in range(sequences)))
    seconds = time.perf_counter() - started
    calls = await upstream_calls(http, url) - calls
    made = sum(n for n, _, _ in results)
    summaries = [s for _, s, _ in results if s is not None]
    accept = [s["acceptance_rate"] for s in summaries if s.get("acceptance_rate") is not None]
    per_round = [s["tokens_per_round"] for s in summaries if s.get("tokens_per_round") is not None]
    return {
        "tokens_per_s": made / seconds,
        "acceptance": statistics.mean(accept) if accept else None,
        "tokens_per_round": statistics.mean(per_round) if per_round else None,
        "upstream_requests_per_token": calls / max(made, 1),
        "failed": sum(1 for _, _, e in results if e is not None),
        "errors": [e for _, _, e in results if e is not None][:3],
    }


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def rounded(value: float | None, digits: int = 2) -> float | str:
    return "-" if value is None else round(value, digits)


async def run(url: str, teacher_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    k: int | str = args.k if args.k == "auto" else int(args.k)
    spec = {"k": k, "drafter": args.drafter}
    rows: list[dict[str, Any]] = []
    async with client() as http:
        prompt = await chat_ids(http, teacher_url)
        await gateway_batch(http, url, prompt, 4, 1, None)  # warm-up
        await gateway_batch(http, url, prompt, 4, 1, spec)
        await teacher_run(http, teacher_url, prompt, 4, 1)
        for seqs in args.sequences:
            plain: list[dict[str, Any]] = []
            fast: list[dict[str, Any]] = []
            alone: list[float] = []
            for _ in range(args.repeats):
                plain.append(await gateway_batch(http, url, prompt, args.tokens, seqs, None))
                fast.append(await gateway_batch(http, url, prompt, args.tokens, seqs, spec))
                alone_run = await teacher_run(http, teacher_url, prompt, args.tokens, seqs)
                alone.append(alone_run.tokens_per_s)
            teacher_rate = statistics.median(alone)
            plain_rate = median(plain, "tokens_per_s") or float("nan")
            for mode, runs in (("plain", plain), ("speculative", fast)):
                rate = median(runs, "tokens_per_s") or float("nan")
                row = {
                    "sequences": seqs,
                    "mode": mode,
                    "tokens_per_s": round(rate, 2),
                    "x_plain": round(rate / plain_rate, 3),
                    "x_teacher": round(rate / teacher_rate, 3),
                    "acceptance": rounded(median(runs, "acceptance"), 3),
                    "tokens_per_round": rounded(median(runs, "tokens_per_round")),
                    "upstream_requests_per_token": rounded(
                        median(runs, "upstream_requests_per_token"), 3
                    ),
                    "failed": sum(r["failed"] for r in runs),
                    "per_repeat_tokens_per_s": [round(r["tokens_per_s"], 2) for r in runs],
                    "errors": [e for r in runs for e in r["errors"]][:3],
                }
                rows.append(row)
                print_row(COLUMNS, row)
            teacher_row = {
                "sequences": seqs,
                "mode": "teacher",
                "tokens_per_s": round(teacher_rate, 2),
                "x_plain": round(teacher_rate / plain_rate, 3),
                "x_teacher": 1.0,
                "acceptance": "-",
                "tokens_per_round": "-",
                "upstream_requests_per_token": round(1 / args.tokens, 3),
                "failed": 0,
                "per_repeat_tokens_per_s": [round(r, 2) for r in alone],
            }
            rows.append(teacher_row)
            print_row(COLUMNS, teacher_row)
    return rows


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, float | None, float]]:
    def at(seqs: int, mode: str, key: str) -> float | None:
        found = [r[key] for r in rows if r["sequences"] == seqs and r["mode"] == mode]
        return found[0] if found else None

    return [
        ("speculative x plain at 1 sequence", at(1, "speculative", "x_plain"), 1.5),
        ("speculative x plain at 8 sequences", at(8, "speculative", "x_plain"), 1.5),
        ("speculative x teacher alone at 1 sequence", at(1, "speculative", "x_teacher"), 0.6),
    ]


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=int, default=48, help="per stream")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--k", default="auto", help='drafted tokens per round, or "auto"')
    parser.add_argument("--drafter", default="auto", choices=["auto", "base", "teacher"])
    parser.add_argument("--base-url", default="http://127.0.0.1:8101")
    parser.add_argument("--teacher-url", default="http://127.0.0.1:8102")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "speculative.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    if not all(map(is_healthy, (args.base_url, args.teacher_url))):
        parser.error(f"no vLLM pair at {args.base_url}, {args.teacher_url}: dual-vllm local start")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "commit": commit(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    print_row(COLUMNS)
    local = {"DUAL_VLLM_TOKENIZER": str(Layout.from_env().teacher)}
    log = args.out.parent / "gateway-speculative.log"
    with gateway(args.base_url, args.teacher_url, log, local) as (url, _):
        rows = asyncio.run(run(url, args.teacher_url, args))
    result["rows"] = rows
    result["targets"] = [
        {
            "target": name,
            "measured": value,
            "goal": goal,
            "met": value is not None and value >= goal,
        }
        for name, value, goal in targets(rows)
    ]
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    sys.stdout.write("\n")
    for t in result["targets"]:
        sys.stdout.write(
            f"{t['target']}: {t['measured']} (target >= {t['goal']}: "
            f"{'met' if t['met'] else 'NOT met'})\n"
        )
    before, after = result["load_average_before"], result["load_average_after"]
    sys.stdout.write(f"load average before/after: {before} / {after}\n")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(f"wrote {args.out}\n")


if __name__ == "__main__":
    cli()
