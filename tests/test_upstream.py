"""app/upstream.py against respx: request shapes, parsing, every error path, retries."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import respx

from app import upstream as upstream_module
from app.errors import (
    UpstreamError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from app.probes import parse_top_logprobs
from app.replicas import redact_url
from app.settings import Settings
from app.upstream import ModelInfo, StartupError, UpstreamClient

URL = "http://teacher.test"
COMPLETIONS = f"{URL}/v1/completions"


def completion(top: Any) -> dict[str, Any]:
    """A vLLM completions body whose first position's top_logprobs is `top`."""
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": "x",
                "logprobs": {
                    "text_offset": [0],
                    "token_logprobs": [-0.1],
                    "tokens": ["token_id:5"],
                    "top_logprobs": [top],
                },
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def vllm_error(status: int, message: str) -> httpx.Response:
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return httpx.Response(status, json=body)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

        self.retries: list[tuple[str, str]] = []
        self.ejected: list[str] = []

    def upstream_call(self, upstream: str, seconds: float, error: str | None) -> None:
        self.calls.append((upstream, error))

    def upstream_retry(self, upstream: str, reason: str) -> None:
        self.retries.append((upstream, reason))

    def replica_ejected(self, upstream: str) -> None:
        self.ejected.append(upstream)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "_RETRY_BASE_SECONDS", 0.0)


@pytest.fixture(autouse=True)
def httpx_own_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """respx mocks httpx's own transport: these tests run the client on it instead of the
    aiohttp-backed one (which the tests over real sockets, e.g. test_api_openai_client, use)."""
    monkeypatch.setattr(
        upstream_module,
        "AiohttpTransport",
        lambda limits: httpx.AsyncHTTPTransport(limits=limits),
    )


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"base_url": ["http://base.test"], "teacher_url": [URL]}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def client(recorder: Recorder) -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient(
        "teacher", [URL], make_settings(upstream_retries=2), model="m", observer=recorder
    ) as c:
        yield c


# --- the probe ---------------------------------------------------------------------------------


async def test_probe_request_body(mock: respx.MockRouter, client: UpstreamClient) -> None:
    route = mock.post(COMPLETIONS).respond(json=completion({"token_id:5": -0.1}))
    await client.topk([1, 2, 3], 7)
    sent = route.calls.last.request

    assert json.loads(sent.content) == {
        "prompt": [1, 2, 3],
        "max_tokens": 1,
        "logprobs": 7,
        "temperature": 0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "return_tokens_as_token_ids": True,
        "stream": False,
        "model": "m",
    }
    assert sent.headers["content-type"] == "application/json"


async def test_topk_parses_ids_and_keeps_k_plus_one(
    mock: respx.MockRouter, client: UpstreamClient
) -> None:
    # vLLM's sampled token first (outside the top K), then the K best.
    top = {"token_id:900": -7.5, "token_id:5": -0.1, "token_id:17": -2.5, "token_id:3": -9999.0}
    mock.post(COMPLETIONS).respond(json=completion(top))
    result = await client.topk([1], 3)
    assert result == {900: -7.5, 5: -0.1, 17: -2.5, 3: -9999.0}


async def test_null_values_are_dropped(mock: respx.MockRouter, client: UpstreamClient) -> None:
    mock.post(COMPLETIONS).respond(json=completion({"token_id:5": -0.1, "token_id:6": None}))
    result = await client.topk([1], 2)
    assert list(result) == [5]


@pytest.mark.parametrize(
    ("top", "match"),
    [
        (None, "null top_logprobs"),
        ({}, "no usable top_logprobs"),
        ({"token_id:5": None}, "no usable top_logprobs"),
        ({" the": -0.1}, "keyed logprobs by text"),
        ({"token_id:abc": -0.1}, "bad token key"),
        ({"token_id:5": "x"}, "non-numeric"),
        ({"token_id:5": True}, "non-numeric"),
        ([1, 2], "malformed top_logprobs"),
    ],
)
async def test_malformed_top_logprobs_are_502(
    mock: respx.MockRouter, client: UpstreamClient, top: Any, match: str
) -> None:
    mock.post(COMPLETIONS).respond(json=completion(top))
    with pytest.raises(UpstreamError, match=match) as info:
        await client.topk([1], 2)
    assert type(info.value) is UpstreamError
    assert info.value.status == 502
    assert info.value.upstream == "teacher"


@pytest.mark.parametrize(
    "body",
    [{"choices": []}, {"choices": [{"logprobs": None}]}, {"nothing": 1}, [], "text"],
    ids=["no-choices", "no-logprobs", "no-keys", "list", "string"],
)
def test_parse_rejects_bodies_without_logprobs(body: Any) -> None:
    with pytest.raises(UpstreamError, match="without top_logprobs"):
        parse_top_logprobs(body, upstream="base")


async def test_not_json_is_502(mock: respx.MockRouter, client: UpstreamClient) -> None:
    mock.post(COMPLETIONS).respond(200, text="<html>oops</html>")
    with pytest.raises(UpstreamError, match="not JSON") as info:
        await client.topk([1], 2)
    assert info.value.status == 502


# --- error mapping and retries -------------------------------------------------------------------


async def test_read_timeout_is_504_after_retries(
    mock: respx.MockRouter, client: UpstreamClient, recorder: Recorder
) -> None:
    route = mock.post(COMPLETIONS).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(UpstreamTimeoutError) as info:
        await client.topk([1], 2)
    assert info.value.status == 504
    assert route.call_count == 3  # a probe is idempotent: timeouts are retried too
    assert recorder.calls == [("teacher", "timeout")] * 3
    assert recorder.retries == [("teacher", "timeout")] * 2


async def test_connect_error_is_retried_then_503(
    mock: respx.MockRouter, client: UpstreamClient, recorder: Recorder
) -> None:
    route = mock.post(COMPLETIONS).mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(UpstreamUnavailableError, match="unreachable") as info:
        await client.topk([1], 2)
    assert info.value.status == 503
    assert route.call_count == 3  # 1 + upstream_retries
    assert recorder.calls == [("teacher", "unavailable")] * 3


async def test_connect_timeout_is_unavailable_and_retried(
    mock: respx.MockRouter, client: UpstreamClient
) -> None:
    ok = httpx.Response(200, json=completion({"token_id:5": -0.1}))
    route = mock.post(COMPLETIONS).mock(side_effect=[httpx.ConnectTimeout("syn"), ok])
    result = await client.topk([1], 2)
    assert list(result) == [5]
    assert route.call_count == 2


async def test_503_is_retried_until_success(
    mock: respx.MockRouter, client: UpstreamClient, recorder: Recorder
) -> None:
    ok = httpx.Response(200, json=completion({"token_id:5": -0.1}))
    busy = vllm_error(503, "engine busy")
    route = mock.post(COMPLETIONS).mock(side_effect=[busy, busy, ok])
    result = await client.topk([1], 2)
    assert list(result) == [5]
    assert route.call_count == 3
    assert recorder.calls == [("teacher", "unavailable")] * 2 + [("teacher", None)]


async def test_503_beyond_retries(mock: respx.MockRouter, client: UpstreamClient) -> None:
    route = mock.post(COMPLETIONS).mock(return_value=vllm_error(503, "engine busy"))
    with pytest.raises(UpstreamUnavailableError, match="engine busy"):
        await client.topk([1], 2)
    assert route.call_count == 3


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_other_5xx_is_502_after_retries(
    mock: respx.MockRouter, client: UpstreamClient, recorder: Recorder, status: int
) -> None:
    route = mock.post(COMPLETIONS).mock(return_value=vllm_error(status, "engine died"))
    with pytest.raises(UpstreamError, match=f"upstream error \\({status}\\): engine died") as info:
        await client.topk([1], 2)
    assert type(info.value) is UpstreamError
    assert info.value.status == 502
    assert route.call_count == 3
    assert recorder.retries == [("teacher", "server_error")] * 2


async def test_500_then_success(mock: respx.MockRouter, client: UpstreamClient) -> None:
    ok = httpx.Response(200, json=completion({"token_id:5": -0.1}))
    route = mock.post(COMPLETIONS).mock(side_effect=[vllm_error(500, "oops"), ok])
    assert list(await client.topk([1], 2)) == [5]
    assert route.call_count == 2


async def test_4xx_keeps_the_upstream_message(
    mock: respx.MockRouter, client: UpstreamClient, recorder: Recorder
) -> None:
    message = "Token id 99999 is out of vocabulary"
    route = mock.post(COMPLETIONS).mock(return_value=vllm_error(400, message))
    with pytest.raises(UpstreamRejectedError) as info:
        await client.topk([99999], 2)
    assert message in info.value.message
    assert info.value.status == 400
    assert info.value.kind.type == "invalid_request_error"
    assert route.call_count == 1
    assert recorder.calls == [("teacher", "rejected")]


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(404, json={"detail": "Not Found"}), "Not Found"),
        (httpx.Response(422, text="plain words"), "plain words"),
        (httpx.Response(401, json={"error": "Unauthorized"}), "Unauthorized"),
    ],
)
async def test_4xx_message_shapes(
    mock: respx.MockRouter, client: UpstreamClient, response: httpx.Response, expected: str
) -> None:
    mock.post(COMPLETIONS).mock(return_value=response)
    with pytest.raises(UpstreamRejectedError, match=expected):
        await client.topk([1], 2)


async def test_broken_connection_is_502_after_retries(
    mock: respx.MockRouter, client: UpstreamClient, recorder: Recorder
) -> None:
    route = mock.post(COMPLETIONS).mock(side_effect=httpx.RemoteProtocolError("eof"))
    with pytest.raises(UpstreamError) as info:
        await client.topk([1], 2)
    assert type(info.value) is UpstreamError
    assert route.call_count == 3
    assert recorder.retries == [("teacher", "reset")] * 2


async def test_retry_deadline_stops_retrying(
    mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_module, "_RETRY_BASE_SECONDS", 1.0)
    route = mock.post(COMPLETIONS).mock(return_value=vllm_error(500, "down"))
    settings = make_settings(upstream_retries=5, upstream_retry_deadline=0.2)
    async with UpstreamClient("teacher", [URL], settings) as c:
        with pytest.raises(UpstreamError):
            await c.topk([1], 2)
    assert route.call_count == 1  # the first backoff (>= 0.5 s) would pass the deadline


def test_backoff_has_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "_RETRY_BASE_SECONDS", 0.1)
    delays = {upstream_module._backoff(3) for _ in range(20)}
    assert len(delays) > 1
    assert all(0.4 <= d <= 0.8 for d in delays)


async def test_error_messages_never_name_the_url(mock: respx.MockRouter) -> None:
    secret = "http://user:hunter2@r0.test"
    mock.post("http://user:hunter2@r0.test/v1/completions").mock(
        side_effect=httpx.ConnectError("refused")
    )
    async with UpstreamClient("base", [secret], make_settings(upstream_retries=0)) as c:
        with pytest.raises(UpstreamUnavailableError) as info:
            await c.topk([1], 2)
    assert "r0.test" not in info.value.message
    assert "hunter2" not in info.value.message
    assert info.value.message.startswith("base upstream is unreachable")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:secret@host:8000/v1", "http://user:***@host:8000/v1"),
        ("https://token@host", "https://***@host"),
        ("http://host:8000", "http://host:8000"),
        ("http://host/a@b", "http://host/a@b"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


async def test_no_retries_when_disabled(mock: respx.MockRouter) -> None:
    route = mock.post(COMPLETIONS).mock(side_effect=httpx.ConnectError("refused"))
    async with UpstreamClient("teacher", [URL], make_settings(upstream_retries=0)) as c:
        with pytest.raises(UpstreamUnavailableError):
            await c.topk([1], 2)
    assert route.call_count == 1


async def test_client_has_explicit_limits_and_timeouts() -> None:
    settings = make_settings(
        upstream_connect_timeout=1.5, upstream_read_timeout=7.0, upstream_max_connections=9
    )
    c = UpstreamClient("base", ["http://b"], settings)
    with pytest.raises(RuntimeError, match="before start"):
        await c.topk([1], 1)
    async with c:
        inner = c._client
        assert inner is not None
        assert inner.timeout == httpx.Timeout(connect=1.5, read=7.0, write=7.0, pool=7.0)
        pool = inner._transport._pool  # type: ignore[attr-defined]
        assert pool._max_connections == 9
    assert c._client is None


# --- replicas ---------------------------------------------------------------------------------


async def test_replica_affinity(mock: respx.MockRouter) -> None:
    urls = ["http://r0.test", "http://r1.test/"]
    a = mock.post("http://r0.test/v1/completions").respond(json=completion({"token_id:1": 0.0}))
    b = mock.post("http://r1.test/v1/completions").respond(json=completion({"token_id:1": 0.0}))
    async with UpstreamClient("base", urls, make_settings()) as c:
        assert [c.replica(k) for k in (0, 1, 2, 7)] == [
            "http://r0.test",
            "http://r1.test",
            "http://r0.test",
            "http://r1.test",
        ]
        for _ in range(3):
            await c.topk([1], 1, affinity=5)
    assert (a.call_count, b.call_count) == (0, 3)


# --- discovery, tokenization -------------------------------------------------------------------


def models_body(*cards: tuple[str, int | None]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "root": f"/m/{name}", "max_model_len": n}
            for name, n in cards
        ],
    }


async def test_discover(mock: respx.MockRouter) -> None:
    mock.get("http://r0.test/v1/models").respond(json=models_body(("a", 4096), ("b", 100)))
    mock.get("http://r1.test/v1/models").respond(json=models_body(("a", 2048)))
    async with UpstreamClient("base", ["http://r0.test", "http://r1.test"], make_settings()) as c:
        info = await c.discover()
    assert info == ModelInfo("a", 2048, "/m/a")  # the smallest context over replicas
    assert c.model == "a"


async def test_discover_configured_model(mock: respx.MockRouter) -> None:
    mock.get(f"{URL}/v1/models").respond(json=models_body(("a", 4096), ("b", 100)))
    async with UpstreamClient("teacher", [URL], make_settings(), model="b") as c:
        assert (await c.discover()).max_model_len == 100
    async with UpstreamClient("teacher", [URL], make_settings(), model="zzz") as c:
        with pytest.raises(StartupError, match=r"does not serve model 'zzz'.*TEACHER_MODEL"):
            await c.discover()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (models_body(), "serves no model"),
        (models_body(("a", None)), "max_model_len"),
    ],
)
async def test_discover_refuses(mock: respx.MockRouter, body: Any, match: str) -> None:
    mock.get(f"{URL}/v1/models").respond(json=body)
    async with UpstreamClient("teacher", [URL], make_settings()) as c:
        with pytest.raises(StartupError, match=match):
            await c.discover()


async def test_discover_malformed(mock: respx.MockRouter) -> None:
    mock.get(f"{URL}/v1/models").respond(json={"data": None})
    async with UpstreamClient("teacher", [URL], make_settings()) as c:
        with pytest.raises(UpstreamError, match="malformed /v1/models"):
            await c.discover()


async def test_discover_replicas_must_agree(mock: respx.MockRouter) -> None:
    mock.get("http://r0.test/v1/models").respond(json=models_body(("a", 10)))
    mock.get("http://r1.test/v1/models").respond(json=models_body(("b", 10)))
    async with UpstreamClient("base", ["http://r0.test", "http://r1.test"], make_settings()) as c:
        with pytest.raises(StartupError, match="replicas serve different models"):
            await c.discover()


async def test_tokenize_detokenize(mock: respx.MockRouter, client: UpstreamClient) -> None:

    tok = mock.post(f"{URL}/tokenize").respond(
        json={"count": 2, "max_model_len": 10, "tokens": [4, 5], "token_strs": None}
    )
    detok = mock.post(f"{URL}/detokenize").respond(json={"prompt": "hé"})
    assert await client.tokenize("hi", add_special_tokens=False) == [4, 5]
    assert json.loads(tok.calls.last.request.content) == {
        "prompt": "hi",
        "add_special_tokens": False,
        "model": "m",
    }
    assert await client.tokenize_chat([{"role": "user", "content": "hi"}]) == [4, 5]
    assert json.loads(tok.calls.last.request.content) == {
        "messages": [{"role": "user", "content": "hi"}],
        "add_generation_prompt": True,
        "add_special_tokens": False,
        "model": "m",
    }
    assert await client.detokenize([4, 5]) == "hé"
    assert json.loads(detok.calls.last.request.content) == {"tokens": [4, 5], "model": "m"}


@pytest.mark.parametrize("body", [{"tokens": ["a"]}, {"tokens": None}, [], {"tokens": [True]}])
async def test_tokenize_malformed(
    mock: respx.MockRouter, client: UpstreamClient, body: Any
) -> None:
    mock.post(f"{URL}/tokenize").respond(json=body)
    with pytest.raises(UpstreamError, match="malformed /tokenize"):
        await client.tokenize("x")


async def test_detokenize_malformed(mock: respx.MockRouter, client: UpstreamClient) -> None:
    mock.post(f"{URL}/detokenize").respond(json={"text": "x"})
    with pytest.raises(UpstreamError, match="malformed /detokenize"):
        await client.detokenize([1])


async def test_tokenizer_info(mock: respx.MockRouter, client: UpstreamClient) -> None:
    route = mock.get(f"{URL}/tokenizer_info")
    route.respond(json={"eos_token": "</s>"})
    assert await client.tokenizer_info() == {"eos_token": "</s>"}
    route.respond(404, json={"detail": "Not Found"})
    assert await client.tokenizer_info() is None


async def test_check_logprobs(mock: respx.MockRouter, client: UpstreamClient) -> None:
    route = mock.post(COMPLETIONS)
    route.mock(
        return_value=vllm_error(
            400,
            "Requested sample logprobs of 64, which is greater than max allowed: 20 "
            "(parameter=logprobs, value=64)",
        )
    )
    with pytest.raises(StartupError, match=r"at most 20 logprobs.*--max-logprobs 64"):
        await client.check_logprobs([1], 64)
    route.mock(return_value=vllm_error(400, "something else"))
    with pytest.raises(StartupError, match=r"rejected a logprobs=64 probe: .*something else"):
        await client.check_logprobs([1], 64)
    route.respond(json=completion({"token_id:1": -0.1}))
    await client.check_logprobs([1], 64)


async def test_health(mock: respx.MockRouter) -> None:
    ok = mock.get("http://r0.test/health").respond(200)
    bad = mock.get("http://r1.test/health").mock(side_effect=httpx.ConnectError("down"))
    async with UpstreamClient("base", ["http://r0.test"], make_settings()) as c:
        assert await c.health() is True
    # One replica answering is enough (the dead one is ejected, not fatal).
    async with UpstreamClient("base", ["http://r0.test", "http://r1.test"], make_settings()) as c:
        assert await c.health() is True
        assert c.healthy() == ["http://r0.test"]
    async with UpstreamClient("base", ["http://r1.test"], make_settings()) as c:
        assert await c.health() is False
    assert ok.call_count == 2
    assert bad.call_count == 2
    assert await UpstreamClient("base", ["http://r0.test"], make_settings()).health() is False


async def test_discover_skips_a_dead_replica_and_asks_each_replica_itself(
    mock: respx.MockRouter,
) -> None:
    mock.get("http://r0.test/v1/models").respond(json=models_body(("m", 4096)))
    dead = mock.get("http://r1.test/v1/models").mock(side_effect=httpx.ConnectError("down"))
    urls = ["http://r0.test", "http://r1.test"]
    async with UpstreamClient("base", urls, make_settings(upstream_retries=1)) as c:
        info = await c.discover()
        assert info.max_model_len == 4096
        assert dead.call_count == 2  # retried on itself, not answered by r0
        assert c.healthy() == ["http://r0.test"]
        assert c.replica(1) == "http://r0.test"  # its sequences go to r0 meanwhile


async def test_a_retry_moves_to_another_replica(mock: respx.MockRouter) -> None:
    ok = completion({"token_id:5": -0.1})
    r0 = mock.post("http://r0.test/v1/completions").mock(side_effect=httpx.ConnectError("x"))
    r1 = mock.post("http://r1.test/v1/completions").respond(json=ok)
    urls = ["http://r0.test", "http://r1.test"]
    async with UpstreamClient("base", urls, make_settings(upstream_retries=1)) as c:
        assert list(await c.topk([1], 2, affinity=0)) == [5]
        assert (r0.call_count, r1.call_count) == (1, 1)
        # r0 is ejected: the next probe of the same sequence goes to r1 directly.
        await c.topk([1], 2, affinity=0)
        assert (r0.call_count, r1.call_count) == (1, 2)
