"""The official `openai` client (sync and async, streaming and not, extra_body) against the
gateway on a real uvicorn, with the fake vLLM pair on real ports behind it: every error
status as the client sees it, an upstream dying mid-stream, and client disconnects."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from app.main import create_app
from app.metrics import Metrics
from app.settings import Settings
from tests.fakes.vllm import FakeVLLM, Faults, encode, serve, serve_pair


@dataclass
class Live:
    url: str
    base: FakeVLLM
    teacher: FakeVLLM
    metrics: Metrics
    clients: list[openai.OpenAI] = dataclasses.field(default_factory=list)

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """A sync client without retries (closed when the gateway stops)."""
        kwargs.setdefault("api_key", "none")
        client = openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, **kwargs)
        self.clients.append(client)
        return client

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("api_key", "none")
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", max_retries=0, **kwargs)


Factory = Callable[..., contextlib.AbstractContextManager[Live]]


@pytest.fixture(scope="module")
def fake_upstreams() -> Iterator[tuple[str, str, FakeVLLM, FakeVLLM]]:
    """One fake pair on real ports for the module (starting one costs ~1 s)."""
    with serve_pair() as pair:
        yield pair


@pytest.fixture
def live(fake_upstreams: tuple[str, str, FakeVLLM, FakeVLLM]) -> Factory:
    """`with live(**settings) as g:` a fresh gateway (and fresh fault knobs) on the pair."""
    base_url, teacher_url, base, teacher = fake_upstreams

    @contextlib.contextmanager
    def build(**overrides: Any) -> Iterator[Live]:
        base.faults = Faults()
        teacher.faults = Faults()
        settings = Settings(base_url=[base_url], teacher_url=[teacher_url], **overrides)
        metrics = Metrics()
        app = create_app(settings, metrics=metrics)
        with serve(app, lifespan="on", timeout=20) as url:
            state = Live(url, base, teacher, metrics)
            try:
                yield state
            finally:
                for client in state.clients:
                    client.close()
        base.faults = Faults()
        teacher.faults = Faults()

    return build


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def settled(count: Callable[[], int], quiet: float = 0.5, timeout: float = 20.0) -> int:
    """Wait until `count()` has not changed for `quiet` seconds (no new upstream call starts);
    returns it. Fails if it keeps changing for `timeout` seconds."""
    deadline = time.monotonic() + timeout
    value, since = count(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "upstream calls kept starting"
        time.sleep(0.01)
        if count() != value:
            value, since = count(), time.monotonic()
    return value


def requests_total(metrics: Metrics, endpoint: str, outcome: str) -> float:
    labels = {"endpoint": endpoint, "outcome": outcome}
    return metrics.registry.get_sample_value("dual_vllm_requests_total", labels) or 0.0


# --- happy paths ---------------------------------------------------------------------------


def test_sync_client_completions_with_extra_body(live: Factory) -> None:
    with live() as g:
        client = g.client()
        completion = client.completions.create(
            model="dual-vllm",
            prompt="teacher sees this",
            max_tokens=5,
            seed=3,
            logprobs=2,
            extra_body={"base_prompt": "Q: base sees this\nA:", "mixing": {"diagnostics": True}},
        )
        choice = completion.choices[0]
        assert completion.object == "text_completion"
        assert choice.finish_reason in ("stop", "length")
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == len(encode("teacher sees this"))
        assert choice.logprobs is not None
        assert choice.logprobs.tokens is not None
        assert len(choice.logprobs.tokens) == completion.usage.completion_tokens
        extra = choice.model_extra or {}
        assert extra["diagnostics"]["summary"]["tokens"] == completion.usage.completion_tokens
        assert g.base.requests[-1]["prompt"][: len(encode("Q: base sees this\nA:"))] == encode(
            "Q: base sees this\nA:"
        )
        again = client.completions.create(
            model="dual-vllm",
            prompt="teacher sees this",
            max_tokens=5,
            seed=3,
            extra_body={"base_prompt": "Q: base sees this\nA:"},
        )
        assert again.choices[0].text == choice.text


def test_sync_client_streams_completions_and_chat(live: Factory) -> None:
    with live() as g:
        client = g.client()
        request: dict[str, Any] = {"model": "dual-vllm", "max_tokens": 6, "seed": 11}
        full = client.completions.create(prompt="abc", **request).choices[0].text
        chunks = list(
            client.completions.create(
                prompt="abc", stream=True, stream_options={"include_usage": True}, **request
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == full
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens > 0

        messages: Any = [{"role": "user", "content": "hi"}]
        chat = client.chat.completions.create(messages=messages, **request)
        assert chat.choices[0].message.role == "assistant"
        streamed = list(client.chat.completions.create(messages=messages, stream=True, **request))
        assert streamed[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in streamed)
        assert text == chat.choices[0].message.content
        assert streamed[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_client_fields_that_change_nothing_are_accepted(live: Factory) -> None:
    """Fields the official client sends for OpenAI's own platform are accepted and ignored:
    the same seed gives the same text with and without them; a typo inside `mixing` is
    still a 400."""
    with live() as g:
        client = g.client()
        ignored: Any = {
            "user": "u-1",
            "metadata": {"run": "7"},
            "store": False,
            "service_tier": "auto",
            "prompt_cache_key": "cache-1",
            "safety_identifier": "who",
        }
        plain = client.completions.create(model="dual-vllm", prompt="abc", max_tokens=5, seed=2)
        sent = client.completions.create(
            model="dual-vllm",
            prompt="abc",
            max_tokens=5,
            seed=2,
            best_of=1,
            n=1,
            user="u-1",
            extra_body={**ignored, "top_logprobs": 2},
        )
        assert sent.choices[0].text == plain.choices[0].text
        messages: Any = [{"role": "user", "content": "hi"}]
        chat_plain = client.chat.completions.create(
            model="dual-vllm", messages=messages, max_tokens=5, seed=2
        )
        chat_sent = client.chat.completions.create(
            model="dual-vllm",
            messages=messages,
            max_completion_tokens=5,
            seed=2,
            n=None,
            store=False,
            metadata={"run": "7"},
            service_tier="auto",
            user="u-1",
            parallel_tool_calls=False,
            prompt_cache_key="cache-1",
            safety_identifier="who",
        )
        assert chat_sent.choices[0].message.content == chat_plain.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="dual-vllm",
                messages=messages,
                store=False,
                extra_body={"mixing": {"alpah": 0.5}},
            )
        assert info.value.status_code == 400
        assert "alpah" in str(info.value.body)


async def test_async_client_streaming_and_not(live: Factory) -> None:
    with live() as g:
        client = g.async_client()
        messages: Any = [{"role": "user", "content": "hello"}]
        chat = await client.chat.completions.create(
            model="dual-vllm",
            messages=messages,
            max_tokens=4,
            seed=5,
            extra_body={"mixing": {"preset": "conservative", "diagnostics": True}},
        )
        assert (chat.choices[0].model_extra or {})["diagnostics"]["summary"]["tokens"] >= 1
        stream = await client.completions.create(
            model="dual-vllm", prompt=[[5, 6], [7]], n=2, max_tokens=3, stream=True
        )
        finished = {c.choices[0].index async for c in stream if c.choices[0].finish_reason}
        assert finished == {0, 1, 2, 3}
        await client.close()


# --- errors as the client sees them --------------------------------------------------------


def test_client_errors(live: Factory) -> None:
    with live(api_keys=["secret"]) as g:
        with pytest.raises(openai.AuthenticationError) as auth:
            g.client(api_key="wrong").completions.create(model="dual-vllm", prompt="x")
        assert auth.value.status_code == 401
        client = g.client(api_key="secret")
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="dual-vllm", prompt="x", temperature=3)
        assert bad.value.param == "temperature"
        with pytest.raises(openai.BadRequestError) as unsupported:
            client.completions.create(model="dual-vllm", prompt="x", echo=True, logprobs=1)
        assert unsupported.value.param == "echo"
        with pytest.raises(openai.BadRequestError) as extension:
            client.completions.create(
                model="dual-vllm", prompt="x", extra_body={"mixing": {"preset": "wild"}}
            )
        assert extension.value.param == "mixing.preset"
        with pytest.raises(openai.NotFoundError) as missing:
            client.completions.create(model="gpt-4o", prompt="x")
        assert missing.value.code == "model_not_found"


def test_rate_limit_is_429_for_the_client(live: Factory) -> None:
    with live(max_concurrent_requests=1, queue_timeout=0) as g:  # no wait queue
        g.teacher.faults.latency = 0.02
        client = g.client()
        stream = client.completions.create(
            model="dual-vllm",
            prompt="x",
            max_tokens=200,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(stream))  # the stream holds the only slot
        with pytest.raises(openai.RateLimitError) as limited:
            client.completions.create(model="dual-vllm", prompt="y", max_tokens=1)
        assert limited.value.status_code == 429
        stream.close()
        wait_until(lambda: requests_total(g.metrics, "completions", "cancelled") == 1)
        assert client.completions.create(model="dual-vllm", prompt="y", max_tokens=1).choices


@pytest.mark.parametrize(("status", "expected"), [(500, 502), (503, 503)])
def test_upstream_errors_are_5xx_for_the_client(live: Factory, status: int, expected: int) -> None:
    with live(upstream_retries=0) as g:
        g.base.faults.status = status
        with pytest.raises(openai.InternalServerError) as error:
            g.client().completions.create(model="dual-vllm", prompt="x", max_tokens=2)
        assert error.value.status_code == expected


def test_upstream_timeout_is_504_for_the_client(live: Factory) -> None:
    with live(upstream_read_timeout=0.1, upstream_retries=0) as g:
        g.teacher.faults.latency = 0.5
        with pytest.raises(openai.InternalServerError) as error:
            g.client().completions.create(model="dual-vllm", prompt="x", max_tokens=2)
        assert error.value.status_code == 504
        assert error.value.code == "upstream_timeout"


def test_an_upstream_dying_mid_stream_raises_in_the_client(live: Factory) -> None:
    with live(upstream_retries=0) as g:
        g.teacher.faults.status = 500
        g.teacher.faults.status_after = g.teacher.completions_started + 2
        stream = g.client().completions.create(
            model="dual-vllm",
            prompt="x",
            max_tokens=20,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        received: list[str] = []

        def consume() -> None:
            for chunk in stream:
                received.append(chunk.choices[0].text)

        with pytest.raises(openai.APIError) as error:
            consume()
        # Two probes succeeded: both tokens reach the client before the error.
        assert len(received) == 2
        assert "upstream" in error.value.message
        # the client has its error before the server finished the response: wait for it
        wait_until(lambda: requests_total(g.metrics, "completions", "upstream_error") == 1)


# --- disconnects ---------------------------------------------------------------------------


def test_dropping_a_stream_stops_the_upstream_calls(live: Factory) -> None:
    with live() as g:
        g.teacher.faults.latency = 0.02
        with (
            httpx.Client(base_url=g.url, timeout=10) as http,
            http.stream(
                "POST",
                "/v1/completions",
                json={"prompt": "x", "max_tokens": 500, "stream": True, "ignore_eos": True},
            ) as response,
        ):
            lines = response.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data: ")
                if seen == 3:
                    break
        # the client is gone: once the gateway has seen it, upstream calls stop starting
        # (at most the step already under way finishes) and none is left running
        wait_until(lambda: requests_total(g.metrics, "completions", "cancelled") == 1)
        calls = settled(lambda: g.teacher.completions_started)
        wait_until(lambda: g.teacher.in_flight == 0 and g.base.in_flight == 0)
        assert calls < 100  # far from the 500 tokens asked for


def test_a_client_timing_out_on_a_non_stream_request_stops_the_upstream_calls(
    live: Factory,
) -> None:
    with live() as g:
        g.teacher.faults.latency = 0.02
        with pytest.raises(openai.APITimeoutError):
            g.client(timeout=0.3).completions.create(
                model="dual-vllm", prompt="x", max_tokens=500, extra_body={"ignore_eos": True}
            )
        # The gateway has seen the disconnect (in_flight alone also drops to 0 between two
        # steps of a generation that is still running), then no call may start any more.
        wait_until(lambda: requests_total(g.metrics, "completions", "cancelled") == 1)
        calls = settled(lambda: g.teacher.completions_started)
        wait_until(lambda: g.teacher.in_flight == 0 and g.base.in_flight == 0)
        assert calls < 500
