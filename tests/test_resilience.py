"""Issue 16: the gateway against upstreams that fail the way production ones do (in process,
the fake vLLM pair of tests/fakes behind one transport; bounded, no network)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.main import create_app
from app.metrics import Metrics
from app.settings import Settings
from tests.fakes.vllm import BASE_URL, TEACHER_URL, FakeVLLM, fake_pair, pair_transport

TEACHER_2 = "http://teacher-2.fake"


@asynccontextmanager
async def gateway(
    apps: dict[str, Any], settings: Settings, metrics: Metrics
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, metrics=metrics, transport=pair_transport(apps))
    async with LifespanManager(app, startup_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


def frames(text: str) -> list[Any]:
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_failed(response: httpx.Response) -> str | None:
    """Why a stream did not complete cleanly (None when it did)."""
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]}"
    events = frames(response.text)
    if not events or events[-1] != "[DONE]":
        return "no [DONE]"
    for event in events:
        if isinstance(event, dict) and "error" in event:
            return f"error frame: {event['error']}"
    return None


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def run_streams(client: httpx.AsyncClient, count: int, max_tokens: int = 16) -> list[str]:
    async def one(i: int) -> str | None:
        body = {"prompt": f"stream {i}: ", "max_tokens": max_tokens, "stream": True, "seed": i}
        return stream_failed(await client.post("/v1/completions", json=body))

    results = await asyncio.gather(*(one(i) for i in range(count)))
    return [r for r in results if r is not None]


async def test_two_percent_failing_probes_fail_no_stream() -> None:
    """The issue's target: 2 % of probes failing (500 or reset) on both upstreams, 0 of 100
    streams fail; the retries are counted."""
    base, teacher = fake_pair(eos_after=None)
    for i, fake in enumerate((base, teacher)):
        fake.seed_failures(16 + i)
    settings = Settings(
        base_url=[BASE_URL],
        teacher_url=[TEACHER_URL],
        max_concurrent_requests=128,
        max_concurrent_sequences=128,
        upstream_retries=3,
    )
    metrics = Metrics()
    async with gateway({BASE_URL: base.app, TEACHER_URL: teacher.app}, settings, metrics) as c:
        for fake in (base, teacher):
            fake.faults.fail_fraction = 0.02
            fake.faults.fail_kind = "mixed"
        failures = await asyncio.wait_for(run_streams(c, 100), 60)
    assert failures == []
    injected = base.failures_injected + teacher.failures_injected
    assert injected > 0
    retried = sum(
        metric(metrics, "dual_vllm_upstream_retries_total", upstream=u, reason=r)
        for u in ("base", "teacher")
        for r in ("reset", "server_error")
    )
    assert retried >= injected  # each injected failure was retried (a batch once for all)
    assert metric(metrics, "dual_vllm_requests_total", endpoint="completions", outcome="ok") == 100


async def test_a_retry_does_not_change_the_seeded_output() -> None:
    """A probe is idempotent and sampling happens in the gateway: the same seed gives the
    same text with failing probes as without."""
    texts = []
    for fraction in (0.0, 0.5):
        base, teacher = fake_pair(eos_after=None)
        settings = Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL], upstream_retries=5)
        async with gateway(
            {BASE_URL: base.app, TEACHER_URL: teacher.app}, settings, Metrics()
        ) as c:
            teacher.faults.fail_fraction = fraction
            teacher.faults.fail_kind = "mixed"
            response = await c.post(
                "/v1/completions", json={"prompt": "Hello", "max_tokens": 24, "seed": 7}
            )
            assert response.status_code == 200, response.text
            texts.append(response.json()["choices"][0]["text"])
        if fraction:
            assert teacher.failures_injected > 0
    assert texts[0] == texts[1]


async def test_a_dead_replica_moves_sequences_and_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two teacher replicas: one dies mid-run, every stream still completes (its sequences move
    to the other replica), the dead one is ejected; restarted, /health takes it back."""
    base, teacher = fake_pair(eos_after=None)
    teacher_2 = FakeVLLM("teacher", eos_after=None)
    settings = Settings(
        base_url=[BASE_URL],
        teacher_url=[TEACHER_URL, TEACHER_2],
        upstream_retries=2,
        replica_eject_seconds=0.05,
        replica_eject_max_seconds=0.2,
    )
    metrics = Metrics()
    apps = {BASE_URL: base.app, TEACHER_URL: teacher.app, TEACHER_2: teacher_2.app}
    async with gateway(apps, settings, metrics) as c:
        teacher_2.faults.down = True
        with caplog.at_level(logging.WARNING, logger="app.upstream"):
            failures = await asyncio.wait_for(run_streams(c, 20), 60)
        assert failures == []
        assert metric(metrics, "dual_vllm_upstream_replica_ejections_total", upstream="teacher")
        assert "teacher-2.fake" in caplog.text
        assert (await c.get("/ready")).status_code == 200  # one healthy replica is enough
        served = teacher_2.completions_started
        teacher_2.faults.down = False
        for _ in range(100):  # probed back in through /health within the (short) backoff
            await asyncio.sleep(0.02)
            if teacher_2.calls["/health"] and teacher_2.completions_started == served:
                break
        failures = await asyncio.wait_for(run_streams(c, 20), 60)
        assert failures == []
        assert teacher_2.completions_started > served


async def test_a_dead_replica_at_start_up_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, teacher = fake_pair()
    teacher_2 = FakeVLLM("teacher")
    teacher_2.faults.down = True
    settings = Settings(
        base_url=[BASE_URL], teacher_url=[TEACHER_2, TEACHER_URL], upstream_retries=0
    )
    apps = {BASE_URL: base.app, TEACHER_URL: teacher.app, TEACHER_2: teacher_2.app}
    with caplog.at_level(logging.WARNING, logger="app.upstream"):
        async with gateway(apps, settings, Metrics()) as c:
            assert (await c.get("/ready")).status_code == 200
            response = await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            assert response.status_code == 200, response.text
    assert "does not answer at start-up" in caplog.text
