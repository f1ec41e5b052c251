"""Issue 16 §6-7: the wait queue in front of the concurrency limit, and the API docs behind
the API keys (in process, against the fake pair)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from starlette.types import Message

from app.main import create_app
from app.metrics import Metrics
from app.settings import Settings
from tests.fakes.vllm import BASE_URL, TEACHER_URL, FakeVLLM, fake_pair, pair_transport


@asynccontextmanager
async def gateway(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FakeVLLM, Metrics]]:
    base, teacher = fake_pair()
    config = Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL], **overrides)
    metrics = Metrics()
    app = create_app(config, metrics=metrics, transport=pair_transport(base=base, teacher=teacher))
    async with LifespanManager(app, startup_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client, teacher, metrics


BODY = {"prompt": "x", "max_tokens": 3, "ignore_eos": True}


async def test_requests_over_the_limit_wait_in_fifo_order() -> None:
    async with gateway(max_concurrent_requests=1, queue_timeout=30) as (client, teacher, m):
        teacher.faults.latency = 0.05
        done: list[int] = []

        async def one(i: int) -> int:
            response = await client.post("/v1/completions", json=BODY)
            done.append(i)
            return response.status_code

        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0.02)  # arrival order 0, 1, 2, 3
        assert await asyncio.gather(*tasks) == [200] * 4
        assert done == [0, 1, 2, 3]
        waited = m.registry.get_sample_value("dual_vllm_queue_wait_seconds_sum") or 0.0
        assert waited > 0.1
        assert m.registry.get_sample_value("dual_vllm_queue_wait_seconds_count") == 4


async def test_a_wait_too_long_is_429_with_retry_after() -> None:
    async with gateway(max_concurrent_requests=1, queue_timeout=0.2) as (client, teacher, _):
        teacher.faults.latency = 0.5
        slow = asyncio.create_task(client.post("/v1/completions", json=BODY))
        await asyncio.sleep(0.1)
        rejected = await client.post("/v1/completions", json=BODY)
        assert rejected.status_code == 429
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"]["type"] == "rate_limit_error"
        teacher.faults.latency = 0.0
        assert (await slow).status_code == 200
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200


async def test_a_full_queue_is_429_at_once() -> None:
    async with gateway(max_concurrent_requests=1, max_queued_requests=0, queue_timeout=30) as (
        client,
        teacher,
        _,
    ):
        teacher.faults.latency = 0.5
        slow = asyncio.create_task(client.post("/v1/completions", json=BODY))
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        rejected = await client.post("/v1/completions", json=BODY)
        assert rejected.status_code == 429
        assert asyncio.get_running_loop().time() - started < 0.3
        teacher.faults.latency = 0.0
        await slow


async def test_api_docs_follow_the_api_keys() -> None:
    async with gateway(api_keys=["k1"]) as (client, _, _):
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await client.get(path)).status_code == 401, path
            authorized = await client.get(path, headers={"Authorization": "Bearer k1"})
            assert authorized.status_code == 200, path
        assert (await client.get("/health")).status_code == 200
    async with gateway() as (client, _, _):
        assert (await client.get("/openapi.json")).status_code == 200
    async with gateway(docs_enabled=False) as (client, _, _):
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await client.get(path)).status_code == 404, path


async def test_a_stream_abandoned_by_its_client_is_cancelled_never_ok() -> None:
    """The client leaves while the last frames are on their way (the generation is already
    done): the request's outcome is "cancelled", not "ok" - it never got its [DONE]."""
    base, teacher = fake_pair()
    metrics = Metrics()
    app = create_app(
        Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL]),
        metrics=metrics,
        transport=pair_transport(base=base, teacher=teacher),
    )
    async with LifespanManager(app, startup_timeout=120) as manager:
        body = b'{"prompt": "x", "max_tokens": 4, "stream": true}'
        at_done = asyncio.Event()
        sent_body = False

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await at_done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body" and b"[DONE]" in message.get("body", b""):
                at_done.set()
                await asyncio.sleep(3600)  # the socket is gone: this write never completes

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("gw", 80),
            "state": {},
        }
        await asyncio.wait_for(manager.app(scope, receive, send), 30)
    get = metrics.registry.get_sample_value
    assert get("dual_vllm_requests_total", {"endpoint": "completions", "outcome": "ok"}) == 0
    assert get("dual_vllm_requests_total", {"endpoint": "completions", "outcome": "cancelled"}) == 1
