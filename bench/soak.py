"""Soak: the gateway under production-like faults, bounded, loopback only (issue 16).

The fake vLLM servers of tests/fakes (one base, two teacher replicas, each a real uvicorn on
127.0.0.1 in this process) answer 2 % of the probes with a failure (a 500 or a dropped
connection, which uvicorn turns into a 500); the gateway runs as `dual-vllm serve` in its own
process. N streams go through it, C at a time; one teacher replica is killed after a third of
the streams were started and restarted on the same port after two thirds; every tenth client
disconnects after its third frame. Reported: streams completed, errors by kind, and the
gateway's open fds and RSS before (after one warm-up request) and after the run (after the
pool settled).

    PYTHONPATH=. .venv/bin/python bench/soak.py [--streams 100] [--concurrency 20]
        [--max-tokens 32] [--fault 0.02]

Prints a summary and writes results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.vllm import ConnectionReset, FakeVLLM, serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_stats(pid: int) -> dict[str, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return {"fds": fds, "rss_bytes": rss}


async def one_stream(
    client: httpx.AsyncClient, url: str, index: int, max_tokens: int, disconnect: bool
) -> str:
    """ "ok", "disconnected", or the kind of failure."""
    body = {"prompt": f"soak {index}: ", "max_tokens": max_tokens, "stream": True, "seed": index}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                try:
                    code = response.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = None
                return f"status {response.status_code} {code}"
            frames = 0
            last = ""
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                frames += 1
                last = line
                if '"error"' in line:
                    error: dict[str, Any] = json.loads(line[6:])["error"]
                    return f"error frame {error.get('code')}"
                if disconnect and frames == 3:
                    return "disconnected"
            return "ok" if last == "data: [DONE]" else "no [DONE]"
    except httpx.HTTPError as exc:
        return f"client error {type(exc).__name__}"


async def run(args: argparse.Namespace, url: str, replica: Any) -> Counter[str]:
    results: Counter[str] = Counter()
    semaphore = asyncio.Semaphore(args.concurrency)
    started = 0
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def guarded(i: int) -> None:
            nonlocal started
            async with semaphore:
                started += 1
                if started == args.streams // 3:
                    replica.kill()
                if started == 2 * args.streams // 3:
                    replica.restart()
                results[await one_stream(client, url, i, args.max_tokens, i % 10 == 9)] += 1

        await asyncio.gather(*(guarded(i) for i in range(args.streams)))
    return results


class _NoInjectedResets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionReset))


class Replica:
    """A teacher fake on a fixed port that can be killed and restarted."""

    def __init__(self, fake: FakeVLLM, port: int) -> None:
        self.fake, self.port = fake, port
        self._stack: contextlib.ExitStack | None = None
        self.served_before_kill = self.served_at_restart = 0
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(serve(self.fake.app, port=self.port))

    def kill(self) -> None:
        self.served_before_kill = self.fake.completions_started
        sys.stderr.write("  killing teacher replica 2\n")
        self.stop()

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def restart(self) -> None:
        self.served_at_restart = self.fake.completions_started
        sys.stderr.write("  restarting teacher replica 2\n")
        self.start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--fault", type=float, default=0.02)
    args = parser.parse_args()
    # A dropped connection is an exception in the fake: keep uvicorn's traceback out of the way.
    logging.getLogger("uvicorn.error").addFilter(_NoInjectedResets())

    base, teacher_1, teacher_2 = (
        FakeVLLM("base", eos_after=None),
        FakeVLLM("teacher", eos_after=None),
        FakeVLLM("teacher", eos_after=None),
    )
    for seed, fake in enumerate((base, teacher_1, teacher_2)):
        fake.seed_failures(seed)
        fake.faults.latency = 0.002
        fake.faults.fail_kind = "mixed"
    replica = Replica(teacher_2, free_port())
    with serve(base.app) as base_url, serve(teacher_1.app) as teacher_url:
        replica.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DUAL_VLLM_")},
            "DUAL_VLLM_BASE_URL": base_url,
            "DUAL_VLLM_TEACHER_URL": f"{teacher_url},{replica.url}",
            "DUAL_VLLM_MAX_CONCURRENT_REQUESTS": str(args.concurrency),
            "DUAL_VLLM_UPSTREAM_RETRIES": "3",
        }
        gateway = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(port), "--log-level", "error"],
            env=env,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                if gateway.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the gateway did not become ready")
                time.sleep(0.2)
            warm = httpx.post(f"{url}/v1/completions", json={"prompt": "w", "max_tokens": 4})
            warm.raise_for_status()
            before = process_stats(gateway.pid)
            for fake in (base, teacher_1, teacher_2):
                fake.faults.fail_fraction = args.fault
            started = time.perf_counter()
            results = asyncio.run(run(args, url, replica))
            seconds = time.perf_counter() - started
            time.sleep(2.0)  # disconnected streams' upstream calls end; the pool settles
            after = process_stats(gateway.pid)
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
        finally:
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
            replica.stop()
    retries = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith(
            ("dual_vllm_upstream_retries_total", "dual_vllm_upstream_replica_ejections_total")
        )
        and not line.endswith(" 0.0")
    }
    outcomes = {
        line.split('outcome="')[1].split('"')[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith('dual_vllm_requests_total{endpoint="completions"')
        and not line.endswith(" 0.0")
    }
    injected = sum(f.failures_injected for f in (base, teacher_1, teacher_2))
    report = {
        "streams": args.streams,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "fault_fraction": args.fault,
        "seconds": round(seconds, 1),
        "results": dict(results),
        "failures_injected": injected,
        "replica_2_probes": {
            "before_kill": replica.served_before_kill,
            "at_restart": replica.served_at_restart,
            "at_end": teacher_2.completions_started,
        },
        "retries_and_ejections": retries,
        "gateway_outcomes": outcomes,  # the warm-up request included
        "gateway_before": before,
        "gateway_after": after,
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    out = Path("results")
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    expected = {"ok", "disconnected"}
    return 0 if set(results) <= expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
