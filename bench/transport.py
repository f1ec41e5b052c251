"""Client CPU per upstream request: httpx's own transport vs httpx over aiohttp vs aiohttp.

A minimal local server (uvicorn + httptools, its own process) answers every POST with a fixed
probe-sized completions body; this process sends the same probe body with each client, C
requests in flight, and reports its own CPU time (user + system, from getrusage) per request,
plus requests/s. Side by side in one run, alternating clients, on uvloop like the gateway.

    .venv/bin/python bench/transport.py [--requests 3000] [--concurrency 1 32] [--repeats 2]

Prints a table and writes results/transport.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import uvloop
from httpx_aiohttp import AiohttpTransport

TOP = {f"token_id:{i}": -0.1 * i for i in range(21)}
BODY = orjson.dumps(
    {
        "id": "cmpl-x",
        "object": "text_completion",
        "choices": [{"index": 0, "text": "", "logprobs": {"top_logprobs": [TOP]}}],
    }
)
REQUEST = {"prompt": list(range(512)), "max_tokens": 1, "logprobs": 20, "temperature": 0}

SERVER = f"""
import uvicorn
BODY = {BODY!r}
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]}})
    await send({{"type": "http.response.body", "body": BODY}})
uvicorn.run(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), log_level="warning",
            http="httptools", loop="uvloop")
"""

Send = Callable[[], Awaitable[Any]]


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(send: Send, requests: int, concurrency: int) -> tuple[float, float]:
    """(client CPU ms per request, requests per second)."""
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await send()

    start_cpu, start = cpu(), time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    wall = time.perf_counter() - start
    return (cpu() - start_cpu) * 1000 / requests, requests / wall


async def measure(url: str, requests: int, concurrency: int) -> dict[str, tuple[float, float]]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    out: dict[str, tuple[float, float]] = {}
    async with httpx.AsyncClient(limits=limits) as plain:

        async def httpx_own() -> Any:
            response = await plain.post(url, content=orjson.dumps(REQUEST))
            return orjson.loads(response.content)

        await drive(httpx_own, 50, concurrency)  # warm the pool
        out["httpx"] = await drive(httpx_own, requests, concurrency)
    async with httpx.AsyncClient(transport=AiohttpTransport(limits=limits)) as over_aiohttp:

        async def httpx_aiohttp() -> Any:
            response = await over_aiohttp.post(url, content=orjson.dumps(REQUEST))
            return orjson.loads(response.content)

        await drive(httpx_aiohttp, 50, concurrency)
        out["httpx+aiohttp transport"] = await drive(httpx_aiohttp, requests, concurrency)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def aiohttp_own() -> Any:
            async with session.post(url, data=orjson.dumps(REQUEST)) as response:
                return orjson.loads(await response.read())

        await drive(aiohttp_own, 50, concurrency)
        out["aiohttp"] = await drive(aiohttp_own, requests, concurrency)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        for _ in range(100):
            try:
                httpx.post(url, content=b"{}")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        load_before = os.getloadavg()[0]
        rows: list[dict[str, Any]] = []
        for concurrency in args.concurrency:
            for repeat in range(args.repeats):
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    result = runner.run(measure(url, args.requests, concurrency))
                for client, (cpu_ms, rate) in result.items():
                    rows.append(
                        {
                            "client": client,
                            "concurrency": concurrency,
                            "repeat": repeat,
                            "cpu_ms_per_request": round(cpu_ms, 4),
                            "requests_per_second": round(rate, 1),
                        }
                    )
        load_after = os.getloadavg()[0]
    finally:
        server.terminate()
        server.wait()
    out = sys.stdout
    out.write(f"{'client':<26}{'in flight':>10}{'CPU ms/request':>16}{'requests/s':>12}\n")
    for row in rows:
        out.write(
            f"{row['client']:<26}{row['concurrency']:>10}{row['cpu_ms_per_request']:>16.3f}"
            f"{row['requests_per_second']:>12.0f}\n"
        )
    out.write(f"load average: {load_before:.2f} before, {load_after:.2f} after\n")
    Path("results").mkdir(exist_ok=True)
    Path("results/transport.json").write_text(
        json.dumps({"rows": rows, "load": [load_before, load_after]}, indent=2),
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
