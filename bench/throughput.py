"""Throughput at scale (issue 11): the gateway's cost per token and its speed against the pair.

Two parts in one run (both by default; `--fake` or `--real` for one):

fake  Two fake vLLM servers (bench/fake_upstream.py, one process each, no latency) and the
      gateway (`dual-vllm serve`, its own process). C concurrent streaming /v1/completions
      requests (n = 1, `--tokens` each, ignore_eos) for C in `--concurrency`; for the GATEWAY
      process: CPU ms per generated token (utime + stime from /proc), tokens/s, upstream
      requests per token (its own counter dual_vllm_upstream_request_duration_seconds_count:
      probes, /tokenize and /detokenize calls), peak RSS (VmRSS sampled every 50 ms).
real  The gateway against the real CPU pair (`dual-vllm local start`, 8101/8102) for S in
      `--sequences` concurrent streams of `--real-tokens` tokens, alternating with the teacher
      generating the same tokens alone (S concurrent /v1/completions), `--repeats` times.

    PYTHONPATH=. .venv/bin/python bench/throughput.py [--fake] [--real] [--tokens 64]
        [--tokens-256 16] [--concurrency 1 16 64 256] [--sequences 1 4 8 16] [--repeats 3]

Every request sends the same prompt ids (the teacher's /tokenize of one chat message), so no
/tokenize calls are counted. A stream that fails (an upstream error the gateway passes on) is
counted under `failed`, with its first errors in the JSON, and the run goes on.

Prints a table per part and the issue's targets, and writes results/throughput.json (with the
load averages, the commit and the parameters); the processes' logs go next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.localvllm.servers import is_healthy
from app.localvllm.setup import Layout
from tests.fakes.tokenizer import write_fake_tokenizer

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = "Tell me a long story about a lighthouse keeper."
UPSTREAM_CALLS = "dual_vllm_upstream_request_duration_seconds_count"
TICKS = os.sysconf("SC_CLK_TCK")


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def status_mb(pid: int, key: str) -> float:
    """VmRSS / VmHWM of `pid` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


@contextlib.contextmanager
def process(cmd: list[str], ready_url: str, log: Path, env: dict[str, str]) -> Iterator[int]:
    """Run `cmd` until the block ends; yields its pid once `ready_url` answers 200."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=out, cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} not ready after 180 s; see {log}")
            time.sleep(0.2)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def gateway(
    base_url: str, teacher_url: str, log: Path, extra: dict[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """`dual-vllm serve` (as `dual-vllm local run` starts it) with limits above the bench's."""
    port = free_port()
    env = {
        "DUAL_VLLM_BASE_URL": base_url,
        "DUAL_VLLM_TEACHER_URL": teacher_url,
        "DUAL_VLLM_HOST": "127.0.0.1",
        "DUAL_VLLM_PORT": str(port),
        "DUAL_VLLM_MAX_CONCURRENT_REQUESTS": "1024",
        "DUAL_VLLM_MAX_CONCURRENT_SEQUENCES": "1024",
        "DUAL_VLLM_MAX_N": "1024",
        "PYTHONPATH": str(ROOT),
        **(extra or {}),
    }
    cmd = [sys.executable, "-m", "app", "serve", "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/ready", log, env) as pid:
        yield url, pid


@contextlib.contextmanager
def fake_pair(logs: Path) -> Iterator[tuple[str, str, list[int]]]:
    """The two fakes, one process each: yields (base URL, teacher URL, their pids)."""
    urls, pids = [], []
    with contextlib.ExitStack() as stack:
        for role in ("base", "teacher"):
            port = free_port()
            cmd = [sys.executable, "-m", "bench.fake_upstream", "--role", role, "--port", str(port)]
            url = f"http://127.0.0.1:{port}"
            env = {"PYTHONPATH": str(ROOT)}
            pids.append(
                stack.enter_context(process(cmd, f"{url}/health", logs / f"fake-{role}.log", env))
            )
            urls.append(url)
        yield urls[0], urls[1], pids


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Run:
    """One batch of concurrent streams."""

    tokens: int
    seconds: float
    gaps: list[float] = field(default_factory=list)  # seconds between a stream's chunks
    errors: list[str] = field(default_factory=list)  # one per failed stream

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def upstream_calls(client: httpx.AsyncClient, url: str) -> float:
    """The gateway's count of upstream HTTP calls (both upstreams, all endpoints)."""
    text = (await client.get(f"{url}/metrics")).text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith(UPSTREAM_CALLS)
    )


async def stream_one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[int, list[float], str | None]:
    """One streaming /v1/completions: (completion tokens, chunk arrival times, error or None).
    A failed stream counts the chunks it got as its tokens."""
    times: list[float] = []
    tokens: int | None = None
    error: str | None = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return 0, times, f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
        # Read to the end, as OpenAI clients do (leaving early makes the request "cancelled").
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = f"error frame: {event['error']}"
            elif event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            if event.get("choices"):
                times.append(time.perf_counter())
    if tokens is None:
        return len(times), times, error or "stream ended without usage"
    return tokens, times, error


def stream_body(prompt: list[int], tokens: int, seed: int) -> dict[str, Any]:
    """The benchmarks' gateway request: a seeded stream of `tokens` tokens (no EOS stop)."""
    return {
        "model": "dual-vllm",
        "prompt": prompt,
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def gateway_run(
    client: httpx.AsyncClient, url: str, prompt: list[int], tokens: int, concurrency: int
) -> Run:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(stream_one(client, url, stream_body(prompt, tokens, i)) for i in range(concurrency))
    )
    run = Run(sum(n for n, _, _ in results), time.perf_counter() - started)
    for _, times, error in results:
        run.gaps.extend(b - a for a, b in itertools.pairwise(times))
        if error is not None:
            run.errors.append(error)
    if run.errors:
        sys.stderr.write(f"{len(run.errors)} failed stream(s), first: {run.errors[0]}\n")
    return run


async def teacher_run(
    client: httpx.AsyncClient, url: str, prompt: list[int], tokens: int, concurrency: int
) -> Run:
    async def one(seed: int) -> int:
        body = {
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 1.0,
            "ignore_eos": True,
            "seed": seed,
        }
        response = await client.post(f"{url}/v1/completions", json=body)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return Run(sum(counts), time.perf_counter() - started)


async def peak_rss(pid: int, stop: asyncio.Event) -> float:
    peak = 0.0
    while not stop.is_set():
        peak = max(peak, status_mb(pid, "VmRSS"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    return peak


async def chat_ids(client: httpx.AsyncClient, teacher_url: str) -> list[int]:
    body = {"messages": [{"role": "user", "content": MESSAGE}], "add_generation_prompt": True}
    response = await client.post(f"{teacher_url}/tokenize", json=body)
    response.raise_for_status()
    return [int(t) for t in response.json()["tokens"]]


def client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=2048)
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits)


# --- the two parts --------------------------------------------------------------------------


async def fake_part(
    url: str, pid: int, teacher_url: str, fakes: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows = []
    async with client() as http:
        prompt = await chat_ids(http, teacher_url)
        await gateway_run(http, url, prompt, 8, 4)  # warm-up: connections, first-call paths
        for concurrency in args.concurrency:
            tokens = args.tokens_256 if concurrency >= 256 else args.tokens
            calls = await upstream_calls(http, url)
            cpu = cpu_seconds(pid)
            others = sum(cpu_seconds(p) for p in fakes), time.process_time()
            stop = asyncio.Event()
            sampler = asyncio.create_task(peak_rss(pid, stop))
            run = await gateway_run(http, url, prompt, tokens, concurrency)
            cpu = cpu_seconds(pid) - cpu
            fakes_cpu = sum(cpu_seconds(p) for p in fakes) - others[0]
            client_cpu = time.process_time() - others[1]
            stop.set()
            rss = await sampler
            calls = await upstream_calls(http, url) - calls
            n = max(run.tokens, 1)
            rows.append(
                {
                    "concurrency": concurrency,
                    "tokens": run.tokens,
                    "seconds": round(run.seconds, 3),
                    "tokens_per_s": round(run.tokens_per_s, 1),
                    "cpu_ms_per_token": round(1000 * cpu / n, 3),
                    "upstream_requests_per_token": round(calls / n, 3),
                    "peak_rss_mb": round(rss, 1),
                    "hwm_rss_mb": round(status_mb(pid, "VmHWM"), 1),
                    "itl_p50_ms": round(1000 * percentile(run.gaps, 0.5), 2),
                    "itl_p99_ms": round(1000 * percentile(run.gaps, 0.99), 2),
                    "fakes_cpu_ms_per_token": round(1000 * fakes_cpu / n, 3),
                    "client_cpu_ms_per_token": round(1000 * client_cpu / n, 3),
                    "failed_streams": len(run.errors),
                    "errors": run.errors[:3],
                }
            )
            print_row(FAKE_COLUMNS, rows[-1])
    return rows


async def real_part(url: str, teacher_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    async with client() as http:
        prompt = await chat_ids(http, teacher_url)
        await gateway_run(http, url, prompt, 4, 1)  # warm-up (both servers' first requests)
        await teacher_run(http, teacher_url, prompt, 4, 1)
        for seqs in args.sequences:
            mixed: list[Run] = []
            alone: list[Run] = []
            calls = 0.0
            for _ in range(args.repeats):
                before = await upstream_calls(http, url)
                mixed.append(await gateway_run(http, url, prompt, args.real_tokens, seqs))
                calls += await upstream_calls(http, url) - before
                alone.append(await teacher_run(http, teacher_url, prompt, args.real_tokens, seqs))
            gaps = [g for run in mixed for g in run.gaps]
            gateway_rate = statistics.median(r.tokens_per_s for r in mixed)
            teacher_rate = statistics.median(r.tokens_per_s for r in alone)
            rows.append(
                {
                    "sequences": seqs,
                    "gateway_tokens_per_s": round(gateway_rate, 2),
                    "teacher_tokens_per_s": round(teacher_rate, 2),
                    "ratio": round(gateway_rate / teacher_rate, 3),
                    "ratios_per_repeat": [
                        round(m.tokens_per_s / a.tokens_per_s, 3)
                        for m, a in zip(mixed, alone, strict=True)
                    ],
                    "upstream_requests_per_token": round(
                        calls / max(1, sum(r.tokens for r in mixed)), 3
                    ),
                    "itl_p50_ms": round(1000 * percentile(gaps, 0.5), 1),
                    "itl_p99_ms": round(1000 * percentile(gaps, 0.99), 1),
                    "failed_streams": sum(len(r.errors) for r in mixed),
                    "errors": [e for r in mixed for e in r.errors][:3],
                }
            )
            print_row(REAL_COLUMNS, rows[-1])
    return rows


# --- the report -----------------------------------------------------------------------------

FAKE_COLUMNS = {
    "concurrency": "conc",
    "tokens": "tokens",
    "tokens_per_s": "tok/s",
    "cpu_ms_per_token": "CPU ms/tok",
    "upstream_requests_per_token": "upstream req/tok",
    "peak_rss_mb": "peak RSS MB",
    "itl_p50_ms": "ITL p50 ms",
    "itl_p99_ms": "ITL p99 ms",
    "fakes_cpu_ms_per_token": "fakes CPU ms/tok",
    "client_cpu_ms_per_token": "client CPU ms/tok",
    "failed_streams": "failed",
}
REAL_COLUMNS = {
    "sequences": "seqs",
    "gateway_tokens_per_s": "gateway tok/s",
    "teacher_tokens_per_s": "teacher tok/s",
    "ratio": "x teacher",
    "upstream_requests_per_token": "upstream req/tok",
    "itl_p50_ms": "ITL p50 ms",
    "itl_p99_ms": "ITL p99 ms",
    "failed_streams": "failed",
}


def print_row(columns: dict[str, str], row: dict[str, Any] | None = None) -> None:
    """A header (row None) or one row, columns as wide as their titles."""
    cells = [
        f"{title if row is None else row[key]:>{len(title)}}" for key, title in columns.items()
    ]
    sys.stdout.write("  ".join(cells) + "\n")
    sys.stdout.flush()


def targets(fake: list[dict[str, Any]], real: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets against this run (None where the run has no such point)."""

    def at(rows: list[dict[str, Any]], key: str, value: int, metric: str) -> float | None:
        return next((r[metric] for r in rows if r[key] == value), None)

    busy = [r["upstream_requests_per_token"] for r in fake if r["concurrency"] >= 16]
    busy += [r["upstream_requests_per_token"] for r in real if r["sequences"] >= 16]
    checks: list[tuple[str, float | None, float, bool]] = [
        (
            "gateway CPU ms/token at 64 concurrent (fake)",
            at(fake, "concurrency", 64, "cpu_ms_per_token"),
            0.3,
            False,
        ),
        (
            "upstream requests/token at >= 16 concurrent (worst)",
            max(busy) if busy else None,
            0.25,
            False,
        ),
        (
            "gateway peak RSS MB at 256 streams (fake)",
            at(fake, "concurrency", 256, "peak_rss_mb"),
            300,
            False,
        ),
        ("x teacher alone at 1 sequence (real)", at(real, "sequences", 1, "ratio"), 0.45, True),
        ("x teacher alone at 8 sequences (real)", at(real, "sequences", 8, "ratio"), 0.25, True),
    ]
    return [
        {
            "target": name,
            "goal": f"{'>=' if higher else '<='} {goal}",
            "measured": value,
            "met": None if value is None else (value >= goal if higher else value <= goal),
        }
        for name, value, goal, higher in checks
    ]


def target_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'target (issue 11)':<52} {'goal':<7} {'measured':>8}  met"]
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        measured = "-" if r["measured"] is None else r["measured"]
        lines.append(f"{r['target']:<52} {r['goal']:<7} {measured:>8}  {met}")
    return "\n".join(lines) + "\n"


def commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--fake", action="store_true", help="only the fake-upstream part")
    parser.add_argument("--real", action="store_true", help="only the real-pair part")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--tokens", type=int, default=64, help="per stream (fake part)")
    parser.add_argument("--tokens-256", type=int, default=16, help="per stream at >= 256 (fake)")
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--real-tokens", type=int, default=32, help="per stream (real part)")
    parser.add_argument("--repeats", type=int, default=3, help="gateway/teacher pairs (real)")
    parser.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="decode text with the teacher's /detokenize instead of DUAL_VLLM_TOKENIZER",
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8101")
    parser.add_argument("--teacher-url", default="http://127.0.0.1:8102")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "throughput.json")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the fakes and the gateway are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    both = args.fake == args.real
    if (both or args.real) and not all(map(is_healthy, (args.base_url, args.teacher_url))):
        parser.error(f"no vLLM pair at {args.base_url}, {args.teacher_url}: dual-vllm local start")
    logs = args.out.parent
    logs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "commit": commit(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    fake: list[dict[str, Any]] = []
    real: list[dict[str, Any]] = []
    if both or args.fake:
        sys.stdout.write("\nfake upstreams (gateway process only)\n")
        print_row(FAKE_COLUMNS)
        eos = {"DUAL_VLLM_EOS_TOKEN_IDS": "2"}  # the fakes' <|im_end|>
        if not args.no_tokenizer:  # the fakes' tokenizer in the gateway, as deployed
            eos["DUAL_VLLM_TOKENIZER"] = str(write_fake_tokenizer(logs / "fake-tokenizer"))
        with (
            fake_pair(logs) as (base_url, teacher_url, fakes),
            gateway(base_url, teacher_url, logs / "gateway-fake.log", eos) as (url, pid),
        ):
            fake = asyncio.run(fake_part(url, pid, teacher_url, fakes, args))
    if both or args.real:
        sys.stdout.write(f"\nreal CPU pair ({args.base_url}, {args.teacher_url})\n")
        print_row(REAL_COLUMNS)
        local: dict[str, str] = {}
        if not args.no_tokenizer:  # the teacher's tokenizer in the gateway (`local run` does)
            local["DUAL_VLLM_TOKENIZER"] = str(Layout.from_env().teacher)
        with gateway(args.base_url, args.teacher_url, logs / "gateway-real.log", local) as (url, _):
            real = asyncio.run(real_part(url, args.teacher_url, args))
    result.update(fake=fake, real=real, targets=targets(fake, real))
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    sys.stdout.write("\n" + target_table(result["targets"]))
    before, after = result["load_average_before"], result["load_average_after"]
    load = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(before, after, strict=True))
    sys.stdout.write(f"\nload average 1/5/15 min before/after: {load}; commit {result['commit']}\n")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(f"written to {args.out}\n")


if __name__ == "__main__":
    cli()
