"""Issue 16 §5: hostile input is a 4xx, never a 5xx (in process, against the fake pair)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.inputcheck import check_values
from app.main import create_app
from app.metrics import Metrics
from app.protocol import CompletionRequest
from app.settings import Settings
from tests.fakes.vllm import BASE_URL, TEACHER_URL, fake_pair, pair_transport


@asynccontextmanager
async def gateway(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    base, teacher = fake_pair()
    config = Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL], **overrides)
    app = create_app(
        config, metrics=Metrics(), transport=pair_transport(base=base, teacher=teacher)
    )
    async with LifespanManager(app, startup_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


def raw(body: str) -> dict[str, Any]:
    """Request kwargs sending `body` as it is (json.dumps would refuse lone surrogates)."""
    return {"content": body.encode(), "headers": {"content-type": "application/json"}}


SURROGATE = "\\ud800"
BIG = str(2**63)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", f'{{"prompt": "{SURROGATE}"}}', "prompt"),
        ("/v1/completions", f'{{"prompt": ["ok", "a{SURROGATE}"]}}', "prompt[1]"),
        ("/v1/completions", f'{{"prompt": "x", "base_prompt": "{SURROGATE}"}}', "base_prompt"),
        ("/v1/completions", f'{{"prompt": "x", "model": "{SURROGATE}"}}', "model"),
        ("/v1/completions", f'{{"prompt": "x", "stop": ["{SURROGATE}"]}}', "stop[0]"),
        ("/v1/completions", f'{{"prompt": "x", "stop": "{SURROGATE}"}}', "stop"),
        ("/v1/completions", f'{{"prompt": "x", "top_k": {BIG}}}', "top_k"),
        ("/v1/completions", f'{{"prompt": [1, {BIG}]}}', "prompt[1]"),
        ("/v1/completions", f'{{"prompt": "x", "stop_token_ids": [{BIG}]}}', "stop_token_ids[0]"),
        (
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": "hi"}}], "top_k": {BIG}}}',
            "top_k",
        ),
    ],
)
async def test_bad_strings_and_integers_are_400(path: str, body: str, param: str) -> None:
    async with gateway() as client:
        response = await client.post(path, **raw(body))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


def test_a_large_seed_is_still_accepted() -> None:
    check_values(CompletionRequest.model_validate({"prompt": "x", "seed": 2**64 - 1}))


async def test_a_body_over_the_limit_is_413() -> None:
    async with gateway(max_body_bytes=4096) as client:
        big = json.dumps({"prompt": "x" * 5000})
        response = await client.post("/v1/completions", **raw(big))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        # Without a Content-Length (chunked), counted as it arrives.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 1000
            yield b'{"prompt": "x"}'

        response = await client.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        ok = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert ok.status_code == 200


# --- the fuzz: any JSON-ish body, no 5xx -------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from(["\ud800", "\udfff", "a\ud83d"]),  # lone surrogates
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [
    "prompt",
    "base_prompt",
    "messages",
    "base_messages",
    "model",
    "stop",
    "n",
    "max_tokens",
    "top_k",
    "top_p",
    "temperature",
    "seed",
    "logprobs",
    "top_logprobs",
    "stop_token_ids",
    "mixing",
    "stream",
    "echo",
    "ignore_eos",
    "min_tokens",
    "user",
    "logit_bias",
]
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=5)


def encode(body: Any) -> bytes:
    # Python's json keeps lone surrogates as \\ud800 escapes (valid JSON text).
    return json.dumps(body).encode()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies, chat=st.booleans(), valid_prompt=st.booleans())
def test_fuzz_no_5xx(body: dict[str, Any], chat: bool, valid_prompt: bool) -> None:
    import asyncio

    if valid_prompt:  # half the examples get past the required fields
        if chat:
            body.setdefault("messages", [{"role": "user", "content": "hi"}])
        else:
            body.setdefault("prompt", "hi")
    body.pop("stream", None)  # a stream's later errors are frames, not statuses
    body["max_tokens"] = 2 if not isinstance(body.get("max_tokens"), int) else body["max_tokens"]
    path = "/v1/chat/completions" if chat else "/v1/completions"

    async def run() -> httpx.Response:
        async with gateway() as client:
            return await client.post(
                path, content=encode(body), headers={"content-type": "application/json"}
            )

    response = asyncio.run(run())
    assert response.status_code < 500, (body, response.text)
