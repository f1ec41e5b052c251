"""The HTTP API in-process: create_app under asgi-lifespan + httpx.ASGITransport, the real
coordinator, and the fake vLLM pair (tests/fakes) behind one in-process transport.

(ASGITransport buffers whole responses: incremental delivery, disconnects and the official
client are in tests/test_api_openai_client.py on a real uvicorn.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.coordinator import Completion, DualPrompt, Event, GenerationParams
from app.errors import UpstreamUnavailableError
from app.main import create_app
from app.metrics import Metrics
from app.pair import TokenTextCache
from app.settings import Settings
from tests.fakes.vllm import (
    BASE_URL,
    TEACHER_URL,
    FakeVLLM,
    apply_chat_template,
    encode,
    fake_pair,
    pair_transport,
)


@dataclass
class Harness:
    client: httpx.AsyncClient
    base: FakeVLLM
    teacher: FakeVLLM
    metrics: Metrics
    app: FastAPI


Gateway = Callable[..., AbstractAsyncContextManager[Harness]]


@pytest.fixture
def gateway() -> Gateway:
    """`async with gateway(**settings) as g:` the app on a fresh fake pair."""

    @asynccontextmanager
    async def build(**overrides: Any) -> AsyncIterator[Harness]:
        base, teacher = fake_pair()
        settings = Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL], **overrides)
        metrics = Metrics()
        app = create_app(
            settings, metrics=metrics, transport=pair_transport(base=base, teacher=teacher)
        )
        # A cold numba cache compiles the mixing kernel at start-up: seconds on a loaded
        # machine, more than asgi-lifespan's default 5 s startup timeout.
        async with LifespanManager(app, startup_timeout=120) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                yield Harness(client, base, teacher, metrics, app)

    return build


def sse_events(text: str) -> list[Any]:
    """The data payloads of an SSE body ("[DONE]" kept as a string); comments dropped."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- completions ---------------------------------------------------------------------------


async def test_completion_shape_usage_and_choice_order(gateway: Gateway) -> None:
    async with gateway() as g:
        response = await g.client.post(
            "/v1/completions",
            json={"model": "dual-vllm", "prompt": ["Hello", "Bye"], "n": 2, "max_tokens": 4},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion"
        assert body["id"].startswith("cmpl-")
        assert body["model"] == "dual-vllm"
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        for choice in body["choices"]:
            assert choice["finish_reason"] in ("stop", "length")
            assert choice["logprobs"] is None
            assert "diagnostics" not in choice
            assert "token_ids" not in choice
        usage = body["usage"]
        # each prompt counted once (not per choice), prompt tokens = teacher prompt length
        assert usage["prompt_tokens"] == len(encode("Hello")) + len(encode("Bye"))
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 4 <= usage["completion_tokens"] <= 16


async def test_seed_reproduces_and_stream_text_equals_the_non_stream_text(
    gateway: Gateway,
) -> None:
    request = {"prompt": "The sky", "max_tokens": 12, "seed": 7, "return_token_ids": True}
    async with gateway() as g:
        first = (await g.client.post("/v1/completions", json=request)).json()
        second = (await g.client.post("/v1/completions", json=request)).json()
        assert first["choices"][0]["text"] == second["choices"][0]["text"]
        assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"]
        streamed = await g.client.post("/v1/completions", json={**request, "stream": True})
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = sse_events(streamed.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "text_completion" for c in chunks)
        assert all("usage" not in c for c in chunks)  # only with include_usage
        text = "".join(c["choices"][0]["text"] for c in chunks)
        ids = [i for c in chunks for i in c["choices"][0].get("token_ids") or []]
        assert text == first["choices"][0]["text"]
        assert ids == first["choices"][0]["token_ids"]
        assert chunks[-1]["choices"][0]["finish_reason"] == first["choices"][0]["finish_reason"]


async def test_logprobs_in_openai_completions_format(gateway: Gateway) -> None:
    async with gateway() as g:
        body = (
            await g.client.post(
                "/v1/completions",
                # Seeded: an unseeded run sometimes samples a multi-byte character, whose
                # byte tokens each read "\ufffd", so the tokens would not join to the text.
                json={
                    "prompt": "ab",
                    "max_tokens": 6,
                    "logprobs": 3,
                    "ignore_eos": True,
                    "seed": 5,
                },
            )
        ).json()
        choice = body["choices"][0]
        logprobs = choice["logprobs"]
        n = body["usage"]["completion_tokens"]
        assert n == 6
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == n
        assert len(logprobs["top_logprobs"]) == len(logprobs["text_offset"]) == n
        # byte-level fake tokenizer: the token strings are the text
        assert "".join(logprobs["tokens"]) == choice["text"]
        assert logprobs["text_offset"] == [
            sum(len(t) for t in logprobs["tokens"][:i]) for i in range(n)
        ]
        for token, value, top in zip(
            logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
        ):
            assert 3 <= len(top) <= 4  # top-3 of q, plus the sampled token if outside it
            assert next(iter(top)) == token  # vLLM's order: the sampled token first
            assert top[token] == value <= 0
        as_ids = (
            await g.client.post(
                "/v1/completions",
                json={
                    "prompt": "ab",
                    "max_tokens": 3,
                    "logprobs": 1,
                    "seed": 1,
                    "return_tokens_as_token_ids": True,
                    "return_token_ids": True,
                },
            )
        ).json()["choices"][0]
        assert as_ids["logprobs"]["tokens"] == [f"token_id:{i}" for i in as_ids["token_ids"]]
        assert all(k.startswith("token_id:") for t in as_ids["logprobs"]["top_logprobs"] for k in t)


async def test_diagnostics_per_choice_and_per_chunk(gateway: Gateway) -> None:
    request = {"prompt": "x", "max_tokens": 5, "mixing": {"diagnostics": True}}
    async with gateway() as g:
        choice = (await g.client.post("/v1/completions", json=request)).json()["choices"][0]
        diag = choice["diagnostics"]
        tokens = diag["summary"]["tokens"]
        assert tokens == len(diag["token_ids"]) == len(diag["alpha"]) == len(diag["reason"])
        assert diag["reason"][0] == "first_token"
        assert diag["alpha"][0] == 1.0
        for key in ("js", "overlap_mass", "overlap_count", "kl_gap", "chernoff", "filled_mass"):
            assert len(diag[key]) == tokens
        assert all(a is None or 0.0 <= a <= 1.0 for a in diag["alpha"])
        assert 0.0 <= diag["summary"]["fallback_rate"] <= 1.0

        stream = await g.client.post("/v1/completions", json={**request, "stream": True})
        chunks = sse_events(stream.text)[:-1]
        token_chunks = [c for c in chunks if c["choices"][0]["finish_reason"] is None]
        assert all(len(c["choices"][0]["diagnostics"]["token_ids"]) == 1 for c in token_chunks)
        final = chunks[-1]["choices"][0]["diagnostics"]
        assert final["summary"]["tokens"] == len(token_chunks)

        explore = {**request, "mixing": {"diagnostics": True, "preset": "explore"}}
        choice = (await g.client.post("/v1/completions", json=explore)).json()["choices"][0]
        assert "first_token" not in choice["diagnostics"]["reason"]  # no forcing in explore


async def test_speculative_and_certified_fields_over_http(gateway: Gateway) -> None:
    """mixing.speculative / the fast preset and mixing.max_uncertain_mass reach the engine and
    their diagnostics come back, streamed and not."""
    request = {
        "prompt": "x",
        "max_tokens": 8,
        "seed": 3,
        "ignore_eos": True,
        "mixing": {"diagnostics": True, "speculative": {"k": 3}},
    }
    async with gateway() as g:
        choice = (await g.client.post("/v1/completions", json=request)).json()["choices"][0]
        diag = choice["diagnostics"]
        assert set(diag["draft"][:-1]) <= {"accepted", "resampled", "bonus"}
        assert diag["summary"]["acceptance_rate"] is not None
        assert all(u is not None and 0.0 <= u <= 1.0 for u in diag["uncertain_mass"])
        assert len(diag["base_logprob"]) == len(diag["teacher_logprob_exact"]) == 8
        stream = await g.client.post("/v1/completions", json={**request, "stream": True})
        streamed = [c["choices"][0] for c in sse_events(stream.text)[:-1]]
        text = "".join(c["text"] for c in streamed)
        assert text == choice["text"]  # the same seeded rounds, streamed
        fast = {**request, "mixing": {"preset": "fast", "diagnostics": True}}
        choice = (await g.client.post("/v1/completions", json=fast)).json()["choices"][0]
        assert choice["diagnostics"]["draft"][0] is not None
        strict = {**request, "mixing": {"diagnostics": True, "max_uncertain_mass": 0.5}}
        choice = (await g.client.post("/v1/completions", json=strict)).json()["choices"][0]
        assert all(c is not None for c in choice["diagnostics"]["certified"])
        bad = {**request, "mixing": {"speculative": {"k": 99}}}
        response = await g.client.post("/v1/completions", json=bad)
        assert response.status_code == 400
        assert response.json()["error"]["param"].startswith("mixing.speculative")


async def test_base_prompt_goes_to_the_base_only(gateway: Gateway) -> None:
    async with gateway() as g:
        response = await g.client.post(
            "/v1/completions",
            json={"prompt": "teacher view", "base_prompt": "Q: base view\nA:", "max_tokens": 1},
        )
        assert response.status_code == 200
        assert g.teacher.requests[-1]["prompt"] == encode("teacher view")
        assert g.base.requests[-1]["prompt"] == encode("Q: base view\nA:")


async def test_stream_usage_chunk_and_keepalive(gateway: Gateway) -> None:
    async with gateway(stream_keepalive_seconds=0.02) as g:
        g.teacher.faults.latency = 0.06
        response = await g.client.post(
            "/v1/completions",
            json={
                "prompt": "k",
                "max_tokens": 3,
                "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            },
        )
        assert ": keep-alive\n\n" in response.text
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        usage_chunk = events[-2]
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"]["completion_tokens"] == 3
        assert usage_chunk["usage"]["prompt_tokens"] == 1


# --- chat ----------------------------------------------------------------------------------


async def test_chat_prompts_teacher_template_and_plain_base(gateway: Gateway) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    async with gateway() as g:
        response = await g.client.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 2}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("chatcmpl-")
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        teacher_prompt = g.teacher.requests[-1]["prompt"]
        expected = encode(apply_chat_template(messages, add_generation_prompt=True))
        assert teacher_prompt[: len(expected)] == expected
        base_prompt = g.base.requests[-1]["prompt"]
        plain = encode("Question: What is 2+2?\nAnswer:")
        assert base_prompt[: len(plain)] == plain

        await g.client.post(
            "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 1, "base_prompt": "Q: 2+2=?"},
        )
        assert g.base.requests[-1]["prompt"] == encode("Q: 2+2=?")


async def test_chat_stream_role_first_logprobs_and_usage(gateway: Gateway) -> None:
    async with gateway() as g:
        response = await g.client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "n": 2,
                "stream": True,
                "logprobs": True,
                "top_logprobs": 2,
                "stream_options": {"include_usage": True},
            },
        )
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-2]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        for index in (0, 1):
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
            assert mine[0]["delta"]["role"] == "assistant"
            assert all("role" not in c["delta"] for c in mine[1:])
            assert mine[-1]["finish_reason"] in ("stop", "length")
            for c in mine[:-1]:
                (entry,) = c["logprobs"]["content"]
                assert len(entry["top_logprobs"]) == 2
                assert entry["bytes"] == list(entry["token"].encode())
        assert events[-2]["choices"] == []
        assert events[-2]["usage"]["completion_tokens"] > 0


# --- errors: one table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "n": 65}, "n"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 0}, "echo"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 5}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ("/v1/completions", {"prompt": ["a", "b"], "base_prompt": ["c"]}, "base_prompt"),
        ("/v1/completions", {"prompt": [1, -2]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "mixing": {"alpha": 2}}, "mixing.alpha"),
        ("/v1/completions", {"prompt": "x", "mixing": {"typo": 1}}, "mixing.typo"),
        (
            "/v1/completions",
            {"prompt": "x", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ("/v1/completions", {}, "prompt"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "tool", "content": "x"}]},
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools",
        ),
    ],
)
async def test_bad_input_is_400_naming_the_parameter(
    gateway: Gateway, path: str, body: dict[str, Any], param: str
) -> None:
    async with gateway() as g:
        probes = g.teacher.calls["/v1/completions"]  # the start-up checks' probes
        response = await g.client.post(path, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param
        assert error["type"] == "invalid_request_error"
        assert "Traceback" not in error["message"]
        assert "/work" not in error["message"]
        assert g.teacher.calls["/v1/completions"] == probes  # rejected before upstream work


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": ["a", "b"], "n": 40}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 65}),
    ],
)
async def test_too_many_choices_is_400_naming_n_before_any_tokenizing(
    gateway: Gateway, path: str, body: dict[str, Any]
) -> None:
    async with gateway(max_n=64) as g:
        before = (g.teacher.calls["/tokenize"], g.base.calls["/tokenize"])
        response = await g.client.post(path, json=body)
        assert response.status_code == 400, response.text
        choices = 80 if path == "/v1/completions" else 65
        assert response.json()["error"] == {
            "message": f"this request asks for {choices} choices (prompts x n); the limit is 64",
            "type": "invalid_request_error",
            "param": "n",
            "code": None,
        }
        assert (g.teacher.calls["/tokenize"], g.base.calls["/tokenize"]) == before


async def test_top_k_above_the_upstream_limit_is_400_naming_mixing_top_k(
    gateway: Gateway,
) -> None:
    async with gateway() as g:  # the fake upstreams allow at most 20 logprobs
        response = await g.client.post(
            "/v1/completions", json={"prompt": [5], "max_tokens": 2, "mixing": {"top_k": 40}}
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "mixing.top_k"
        assert "mixing.top_k=40" in error["message"]
        assert "limit of 20" in error["message"]


async def test_bad_json_is_400_not_422(gateway: Gateway) -> None:
    async with gateway() as g:
        for content in (b"{not json", b"[1, 2]", b""):
            response = await g.client.post(
                "/v1/completions", content=content, headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, response.text
            assert response.json()["error"]["type"] == "invalid_request_error"


async def test_unknown_model_is_404(gateway: Gateway) -> None:
    async with gateway() as g:
        response = await g.client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
        assert response.status_code == 404
        assert response.json()["error"] == {
            "message": "The model `gpt-4` does not exist; this gateway serves `dual-vllm`.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
        models = (await g.client.get("/v1/models")).json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == ["dual-vllm"]
        # vLLM's card fields: root, and the smaller context of the two upstreams.
        [card] = models["data"]
        assert card["root"] == "dual-vllm"
        assert card["max_model_len"] == min(g.base.max_model_len, g.teacher.max_model_len)


async def test_api_keys(gateway: Gateway) -> None:
    async with gateway(api_keys=["k1", "k2"]) as g:
        body = {"prompt": "x", "max_tokens": 1}
        missing = await g.client.post("/v1/completions", json=body)
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await g.client.post(
            "/v1/completions", json=body, headers={"Authorization": "Bearer k3"}
        )
        assert wrong.status_code == 401
        assert (await g.client.get("/v1/models")).status_code == 401
        for key in ("k1", "k2"):
            ok = await g.client.post(
                "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert ok.status_code == 200
        # liveness, readiness and metrics stay open (probes and scrapers carry no key)
        assert (await g.client.get("/health")).status_code == 200
        assert (await g.client.get("/ready")).status_code == 200
        assert (await g.client.get("/metrics")).status_code == 200
        assert (
            metric(
                g.metrics,
                "dual_vllm_requests_total",
                endpoint="completions",
                outcome="client_error",
            )
            == 2
        )


async def test_concurrency_limit_is_429(gateway: Gateway) -> None:
    # No wait queue: at once (tests/test_admission.py has the queue).
    async with gateway(max_concurrent_requests=1, queue_timeout=0) as g:
        # Slow enough that the first request surely still runs when the second arrives,
        # however loaded the machine; fast again once the second was rejected.
        g.teacher.faults.latency = 0.5
        body = {"prompt": "x", "max_tokens": 3, "ignore_eos": True}
        probes = g.teacher.calls["/v1/completions"]
        slow = asyncio.create_task(g.client.post("/v1/completions", json=body))
        async with asyncio.timeout(30):
            while g.teacher.calls["/v1/completions"] == probes:  # noqa: ASYNC110 (a counter)
                await asyncio.sleep(0.005)
        rejected = await g.client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
        )
        g.teacher.faults.latency = 0.0
        assert rejected.status_code == 429
        assert rejected.json()["error"]["type"] == "rate_limit_error"
        assert (await slow).status_code == 200
        after = await g.client.post("/v1/completions", json=body)
        assert after.status_code == 200  # the slot was given back
        assert (
            metric(
                g.metrics,
                "dual_vllm_requests_total",
                endpoint="chat_completions",
                outcome="rate_limited",
            )
            == 1
        )
        assert metric(g.metrics, "dual_vllm_requests_in_flight", endpoint="completions") == 0


@pytest.mark.parametrize(
    ("status", "expected", "code"),
    [
        (500, 502, "bad_gateway"),
        (503, 503, "upstream_unavailable"),
        (400, 400, None),
    ],
)
async def test_upstream_failures_map_to_the_table(
    gateway: Gateway, status: int, expected: int, code: str | None
) -> None:
    async with gateway(upstream_retries=0) as g:
        g.base.faults.status = status
        response = await g.client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
        assert response.status_code == expected, response.text
        assert response.json()["error"]["code"] == code
        outcome = "client_error" if expected == 400 else "upstream_error"
        assert (
            metric(g.metrics, "dual_vllm_requests_total", endpoint="completions", outcome=outcome)
            == 1
        )


async def test_an_upstream_failing_at_the_start_of_a_stream_keeps_its_status(
    gateway: Gateway,
) -> None:
    async with gateway(upstream_retries=0) as g:
        g.teacher.faults.status = 500
        response = await g.client.post(
            "/v1/completions", json={"prompt": [5], "max_tokens": 3, "stream": True}
        )
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "bad_gateway"


async def test_an_upstream_dying_mid_stream_sends_one_error_frame_then_done(
    gateway: Gateway,
) -> None:
    async with gateway(upstream_retries=0) as g:
        g.teacher.faults.status = 500
        # the 4th per-token call of this request fails (after the start-up probes)
        g.teacher.faults.status_after = g.teacher.completions_started + 3
        response = await g.client.post(
            "/v1/completions",
            json={"prompt": [5], "max_tokens": 10, "stream": True, "ignore_eos": True},
        )
        assert response.status_code == 200
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        errors = [e for e in events[:-1] if "error" in e]
        assert len(errors) == 1
        assert errors[0] is events[-2]
        assert errors[0]["error"]["code"] == "bad_gateway"
        # three probes succeeded: all three tokens reach the client before the error frame
        assert len(events) - 2 == 3
        assert (
            metric(
                g.metrics,
                "dual_vllm_requests_total",
                endpoint="completions",
                outcome="upstream_error",
            )
            == 1
        )


class _Exploding:
    """A backend whose generation fails with a bug (not an app error)."""

    token_texts: Any = None
    models: Any = None

    async def ready(self) -> bool:
        return False

    def check(self, params: GenerationParams, prompts: int) -> None:
        pass

    async def completion_prompts(self, prompt: Any, base_prompt: Any = None) -> list[DualPrompt]:
        return [DualPrompt(teacher=[1], base=[1])]

    async def chat_prompt(
        self,
        messages: Any,
        base_messages: Any = None,
        base_prompt: Any = None,
        template: Any = None,
    ) -> DualPrompt:
        raise UpstreamUnavailableError("teacher is down", upstream="teacher")

    def stream(
        self, prompts: Sequence[DualPrompt], params: GenerationParams
    ) -> AsyncIterator[Event]:
        raise RuntimeError("secret /work/path detail")

    async def generate(
        self, prompts: Sequence[DualPrompt], params: GenerationParams
    ) -> list[Completion]:
        raise RuntimeError("secret /work/path detail")


async def test_unexpected_errors_are_a_generic_500_and_not_ready_is_503() -> None:
    settings = Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL])
    app = create_app(settings, coordinator=_Exploding(), metrics=Metrics())
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            response = await client.post("/v1/completions", json={"prompt": "x"})
            assert response.status_code == 500
            assert response.json()["error"]["message"] == "internal server error"
            assert "/work" not in response.text
            chat = await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
            )
            assert chat.status_code == 503
            assert chat.json()["error"]["code"] == "upstream_unavailable"
            ready = await client.get("/ready")
            assert ready.status_code == 503
            assert (await client.get("/health")).json() == {"status": "ok"}
            missing = await client.get("/v1/nothing")
            assert missing.status_code == 404
            assert missing.json()["error"]["type"] == "invalid_request_error"
            wrong_method = await client.get("/v1/completions")
            assert wrong_method.status_code == 405


async def test_ready_and_metrics(gateway: Gateway) -> None:
    async with gateway() as g:
        assert (await g.client.get("/ready")).json() == {"status": "ready"}
        await g.client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}
        )
        text = (await g.client.get("/metrics")).text
        assert 'dual_vllm_requests_total{endpoint="completions",outcome="ok"} 1.0' in text
        assert "dual_vllm_time_to_first_token_seconds_count 1.0" in text
        g.teacher.faults.health_status = 503
        assert (await g.client.get("/ready")).status_code == 503


class _DownDetokenizer:
    async def decode(self, ids: Sequence[int]) -> str:
        await asyncio.sleep(0)
        raise UpstreamUnavailableError("teacher is down", upstream="teacher")


async def test_token_texts_re_raise_the_typed_upstream_error() -> None:
    # Not an ExceptionGroup: the error table must see the 503 (a group would become a 500, or
    # an "internal" error frame mid-stream).
    texts = TokenTextCache(_DownDetokenizer())
    with pytest.raises(UpstreamUnavailableError):
        await texts([1, 2, 3])


async def test_max_tokens_above_the_context_is_a_400_naming_the_field(gateway: Gateway) -> None:
    async with gateway() as g:
        limit = min(g.base.max_model_len, g.teacher.max_model_len)
        for path, body, param in (
            ("/v1/completions", {"prompt": "x", "max_tokens": limit + 1}, "max_tokens"),
            (
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9999},
                "max_completion_tokens",
            ),
        ):
            response = await g.client.post(path, json=body)
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["param"] == param
            assert error["message"].startswith(f"{param}=")
            assert f"cannot be greater than max_model_len={limit}." in error["message"]


async def test_chat_template_options_reach_the_teachers_rendering_only(gateway: Gateway) -> None:
    """chat_template_kwargs, add_generation_prompt, continue_final_message, reasoning_effort
    and message names go to the teacher's /tokenize (vLLM's TokenizeChatRequest fields); the
    base's plain rendering ignores them; a default request sends none of them."""
    async with gateway() as g:
        user = {"role": "user", "content": "hi", "name": "ann"}
        base_body = {"messages": [user], "max_tokens": 1}
        assert (await g.client.post("/v1/chat/completions", json=base_body)).status_code == 200
        sent = g.teacher.chat_tokenize_bodies[-1]
        assert "chat_template_kwargs" not in sent
        assert "continue_final_message" not in sent
        assert sent["messages"] == [user]
        plain_base = g.base.requests[-1]["prompt"]

        body = {**base_body, "chat_template_kwargs": {"enable_thinking": False}}
        response = await g.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        assert g.teacher.chat_tokenize_bodies[-1]["chat_template_kwargs"] == {
            "enable_thinking": False
        }
        assert response.json()["usage"]["prompt_tokens"] == len(
            encode(apply_chat_template([user], add_generation_prompt=True, enable_thinking=False))
        )
        assert g.base.requests[-1]["prompt"] == plain_base  # the base ignores template options

        body = {**base_body, "reasoning_effort": "none"}
        assert (await g.client.post("/v1/chat/completions", json=body)).status_code == 200
        assert g.teacher.chat_tokenize_bodies[-1]["chat_template_kwargs"] == {
            "reasoning_effort": "none",
            "enable_thinking": False,
        }

        partial = [user, {"role": "assistant", "content": "Hel"}]
        body = {
            "messages": partial,
            "max_tokens": 1,
            "add_generation_prompt": False,
            "continue_final_message": True,
        }
        response = await g.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        expected = apply_chat_template(partial, False, continue_final_message=True)
        assert expected.endswith("Hel")
        assert response.json()["usage"]["prompt_tokens"] == len(encode(expected))

        both = {**body, "add_generation_prompt": True}
        response = await g.client.post("/v1/chat/completions", json=both)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "continue_final_message"
        assert response.json()["error"]["message"] == (
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )


async def test_echo_prepends_each_prompt_text_as_vllm_does(gateway: Gateway) -> None:
    async with gateway() as g:
        body = {"prompt": ["one ", "two "], "n": 2, "max_tokens": 3, "seed": 4}
        plain = (await g.client.post("/v1/completions", json=body)).json()
        echoed = (await g.client.post("/v1/completions", json={**body, "echo": True})).json()
        for a, b in zip(plain["choices"], echoed["choices"], strict=True):
            prompt = body["prompt"][a["index"] // 2]  # type: ignore[index]
            assert b["text"] == prompt + a["text"]
        assert echoed["usage"] == plain["usage"]
        response = await g.client.post(
            "/v1/completions", json={**body, "echo": True, "stream": True}
        )
        texts: dict[int, str] = {}
        for event in sse_events(response.text):
            if isinstance(event, dict):
                for choice in event["choices"]:
                    texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        assert texts == {c["index"]: c["text"] for c in echoed["choices"]}
