"""Golden wire tests: the exact bytes of /v1/completions and /v1/chat/completions today.

These pin the wire format (key order, separators, float formatting, chunk boundaries, the
error frame) so a refactor of routes/streaming/protocol/coordinator cannot change it silently.
Every request is seeded (or scripted: `tests.fakes.scripted` makes the next token
near-certain), so the output is a function of the request. Only the fields that are random by
nature are normalised, at the byte level: the response `id` (`cmpl-<hex>` / `chatcmpl-<hex>`)
and `created`. Everything else is compared byte for byte with tests/golden/<name>.json (a
non-stream body) or tests/golden/<name>.sse (a whole SSE body).

Regenerate (only when a wire change is intended, and review the diff):

    DUAL_VLLM_REGEN_GOLDEN=1 pytest tests/test_wire_golden.py

Besides the bytes, each case asserts the values it is about (finish_reason, stop_reason, the
held-back text flushed in the finish chunk, ...), so a wrong golden cannot be regenerated
unnoticed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.main import create_app
from app.settings import Settings
from tests.fakes import (
    BASE_URL,
    EOS_ID,
    TEACHER_URL,
    FakeVLLM,
    encode,
    pair_transport,
    scripted,
    serve,
    serve_pair,
)

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("DUAL_VLLM_REGEN_GOLDEN") == "1"

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say something."}]

_ID = re.compile(rb'"id":"(cmpl|chatcmpl)-[0-9a-f]{32}"')
_CREATED = re.compile(rb'"created":[0-9]+')


def normalise(body: bytes) -> bytes:
    """Replace the random `id` and `created` values with fixed placeholders."""
    return _CREATED.sub(b'"created":0', _ID.sub(rb'"id":"\1-ID"', body))


def check_golden(name: str, body: bytes) -> None:
    """Compare the normalised body with tests/golden/<name> (or write it when regenerating)."""
    data = normalise(body)
    path = GOLDEN / name
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        path.write_bytes(data)
        return
    assert path.exists(), f"{path} is missing; DUAL_VLLM_REGEN_GOLDEN=1 writes it"
    expected = path.read_bytes()
    # Text first (a readable diff), then the bytes themselves.
    assert data.decode("utf-8") == expected.decode("utf-8")
    assert data == expected


def frames(body: bytes) -> list[bytes]:
    """The SSE frames of a whole body, each without its trailing blank line."""
    assert body.endswith(b"\n\n"), body[-40:]
    return body[:-2].split(b"\n\n")


def payloads(body: bytes) -> list[Any]:
    """The data payloads ("[DONE]" kept as a string); every frame must be a data frame."""
    out: list[Any] = []
    for item in frames(body):
        assert item.startswith(b"data: "), item
        data = item.removeprefix(b"data: ")
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def one_id_per_stream(body: bytes) -> None:
    """Every chunk of one stream carries the same id and created (before normalising)."""
    chunks = [p for p in payloads(body) if isinstance(p, dict) and "id" in p]
    assert chunks
    assert len({(c["id"], c["created"]) for c in chunks}) == 1


def text_script(text: str) -> list[int]:
    return encode(text)


# --- the in-process gateway ----------------------------------------------------------------


@dataclass
class Harness:
    client: httpx.AsyncClient
    base: FakeVLLM
    teacher: FakeVLLM
    app: FastAPI


@asynccontextmanager
async def gateway(script: Sequence[int] | None = None, **overrides: Any) -> AsyncIterator[Harness]:
    """The app on a fresh fake pair; with `script`, both fakes continue with it, then EOS."""
    distribution = None if script is None else scripted(script)
    base = FakeVLLM("base", distribution=distribution)
    teacher = FakeVLLM("teacher", distribution=distribution)
    settings = Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL], **overrides)
    app = create_app(settings, transport=pair_transport(base=base, teacher=teacher))
    # A cold numba cache compiles the mixing kernel at start-up: seconds on a loaded machine.
    async with LifespanManager(app, startup_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield Harness(client, base, teacher, app)


async def request(
    path: str, body: dict[str, Any], script: Sequence[int] | None = None, **overrides: Any
) -> httpx.Response:
    async with gateway(script, **overrides) as g:
        return await g.client.post(path, json=body)


async def both_ways(
    name: str, path: str, body: dict[str, Any], script: Sequence[int] | None = None
) -> tuple[dict[str, Any], list[Any]]:
    """The non-stream body and the stream of one request, both checked against their golden
    files; returns (the parsed body, the parsed stream payloads)."""
    plain = await request(path, body, script)
    assert plain.status_code == 200, plain.text
    assert plain.headers["content-type"] == "application/json"
    check_golden(f"{name}.json", plain.content)
    stream_body = {**body, "stream": True}
    streamed = await request(path, stream_body, script)
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["content-type"] == "text/event-stream; charset=utf-8"
    one_id_per_stream(streamed.content)
    check_golden(f"{name}.sse", streamed.content)
    events = payloads(streamed.content)
    assert events[-1] == "[DONE]"
    return plain.json(), events


def finish_chunks(events: list[Any]) -> list[dict[str, Any]]:
    return [
        c["choices"][0]
        for c in events
        if isinstance(c, dict) and c.get("choices") and c["choices"][0]["finish_reason"]
    ]


def chunk_texts(events: list[Any], chat: bool = False) -> list[str]:
    """Each chunk's text delta, in order (chunks with choices only)."""
    texts = []
    for c in events:
        if isinstance(c, dict) and c.get("choices"):
            choice = c["choices"][0]
            texts.append(choice["delta"]["content"] if chat else choice["text"])
    return texts


# --- stop strings and stop token ids -------------------------------------------------------

STOP_SCRIPT = text_script("abc STOP def")
BANG = encode("!")[0]
BANG_SCRIPT = text_script("xyz!tail")


@pytest.mark.parametrize("include", [False, True], ids=["cut", "included"])
async def test_stop_string_completions(include: bool) -> None:
    body = {
        "prompt": "Go:",
        "max_tokens": 20,
        "seed": 1,
        "stop": ["STOP"],
        "include_stop_str_in_output": include,
    }
    name = f"stop_string_completions_{'included' if include else 'cut'}"
    plain, events = await both_ways(name, COMPLETIONS, body, STOP_SCRIPT)
    (choice,) = plain["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "STOP"
    assert choice["text"] == ("abc STOP" if include else "abc ")
    (finish,) = finish_chunks(events)
    assert finish["finish_reason"] == "stop"
    assert finish["stop_reason"] == "STOP"
    texts = chunk_texts(events)
    assert "".join(texts) == choice["text"]
    if include:  # nothing is held back when the stop string is to be output
        assert texts == ["a", "b", "c", " ", "S", "T", "O", "P", ""]
    else:  # "S", "ST", "STO" may start the stop string: held back, then cut
        assert texts == ["a", "b", "c", " ", "", "", "", "", ""]


@pytest.mark.parametrize("include", [False, True], ids=["cut", "included"])
async def test_stop_string_chat(include: bool) -> None:
    body = {
        "messages": MESSAGES,
        "max_tokens": 20,
        "seed": 2,
        "stop": "STOP",
        "include_stop_str_in_output": include,
    }
    name = f"stop_string_chat_{'included' if include else 'cut'}"
    plain, events = await both_ways(name, CHAT, body, STOP_SCRIPT)
    (choice,) = plain["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "STOP"
    assert choice["message"] == {
        "role": "assistant",
        "content": "abc STOP" if include else "abc ",
    }
    (finish,) = finish_chunks(events)
    assert (finish["finish_reason"], finish["stop_reason"]) == ("stop", "STOP")
    assert "".join(chunk_texts(events, chat=True)) == choice["message"]["content"]


@pytest.mark.parametrize("include", [False, True], ids=["cut", "included"])
async def test_stop_token_ids_completions(include: bool) -> None:
    body = {
        "prompt": "Go:",
        "max_tokens": 20,
        "seed": 3,
        "stop_token_ids": [BANG],
        "include_stop_str_in_output": include,
        "return_token_ids": True,
    }
    name = f"stop_token_ids_completions_{'included' if include else 'cut'}"
    plain, events = await both_ways(name, COMPLETIONS, body, BANG_SCRIPT)
    (choice,) = plain["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == BANG
    assert choice["text"] == ("xyz!" if include else "xyz")
    assert choice["token_ids"] == encode("xyz!")  # the stop id is a generated token
    (finish,) = finish_chunks(events)
    assert (finish["finish_reason"], finish["stop_reason"]) == ("stop", BANG)
    assert "".join(chunk_texts(events)) == choice["text"]


@pytest.mark.parametrize("include", [False, True], ids=["cut", "included"])
async def test_stop_token_ids_chat(include: bool) -> None:
    body = {
        "messages": MESSAGES,
        "max_tokens": 20,
        "seed": 4,
        "stop_token_ids": [BANG],
        "include_stop_str_in_output": include,
    }
    name = f"stop_token_ids_chat_{'included' if include else 'cut'}"
    plain, events = await both_ways(name, CHAT, body, BANG_SCRIPT)
    (choice,) = plain["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == BANG
    assert choice["message"]["content"] == ("xyz!" if include else "xyz")
    (finish,) = finish_chunks(events)
    assert (finish["finish_reason"], finish["stop_reason"]) == ("stop", BANG)
    assert "".join(chunk_texts(events, chat=True)) == choice["message"]["content"]


async def test_eos_finishes_with_a_null_stop_reason() -> None:
    plain, events = await both_ways(
        "eos_completions", COMPLETIONS, {"prompt": "Go:", "seed": 5}, text_script("hi")
    )
    (choice,) = plain["choices"]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("hi", "stop", None)
    (finish,) = finish_chunks(events)
    assert (finish["finish_reason"], finish["stop_reason"]) == ("stop", None)


# --- held-back text flushed in the finish chunk --------------------------------------------


async def test_a_possible_stop_prefix_is_flushed_at_eos() -> None:
    body = {"prompt": "Go:", "max_tokens": 20, "seed": 6, "stop": ["STOP"]}
    plain, events = await both_ways("held_stop_prefix_at_eos", COMPLETIONS, body, encode("ab ST"))
    (choice,) = plain["choices"]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (
        "ab ST",
        "stop",
        None,
    )
    (finish,) = finish_chunks(events)
    assert finish["text"] == "ST"  # held back while it could start "STOP", flushed at EOS
    # a, b, " ", S and T held back, the EOS token (no text), then the finish chunk
    assert chunk_texts(events) == ["a", "b", " ", "", "", "", "ST"]


async def test_an_incomplete_utf8_character_is_flushed_at_eos() -> None:
    # "café " then a lone lead byte of a 2-byte character, then EOS.
    script = [*encode("café "), 0xC3 + 3]
    body = {"prompt": "Go:", "max_tokens": 20, "seed": 7, "return_token_ids": True}
    plain, events = await both_ways("held_utf8_at_eos", COMPLETIONS, body, script)
    (choice,) = plain["choices"]
    assert choice["text"] == "café \ufffd"
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", None)
    assert choice["token_ids"] == [*script, EOS_ID]
    (finish,) = finish_chunks(events)
    assert finish["text"] == "\ufffd"
    # é spans two tokens: its first byte releases nothing, its second releases "é".
    assert chunk_texts(events) == ["c", "a", "f", "", "é", " ", "", "", "\ufffd"]


async def test_an_incomplete_utf8_character_is_flushed_at_the_length_limit() -> None:
    body = {"messages": MESSAGES, "max_tokens": 4, "seed": 8}
    plain, events = await both_ways("held_utf8_at_length_chat", CHAT, body, encode("café"))
    (choice,) = plain["choices"]
    assert choice["message"]["content"] == "caf\ufffd"
    assert (choice["finish_reason"], choice["stop_reason"]) == ("length", None)
    # The length limit is known when the last token is sampled: that token's chunk releases
    # the incomplete character (not the finish chunk, unlike at EOS).
    (finish,) = finish_chunks(events)
    assert finish["delta"] == {"content": ""}
    assert chunk_texts(events, chat=True) == ["c", "a", "f", "\ufffd", ""]


# --- logprobs, token ids, diagnostics, n and several prompts, usage --------------------------


async def test_completions_logprobs() -> None:
    body = {"prompt": "ab", "max_tokens": 8, "seed": 9, "logprobs": 3}
    plain, events = await both_ways("logprobs_completions", COMPLETIONS, body)
    (choice,) = plain["choices"]
    assert choice["stop_reason"] is None
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"] == [
        sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(logprobs["tokens"]))
    ]
    streamed = [c["choices"][0]["logprobs"] for c in events[:-1] if c["choices"][0]["logprobs"]]
    assert [o for lp in streamed for o in lp["text_offset"]] == logprobs["text_offset"]
    assert [t for lp in streamed for t in lp["tokens"]] == logprobs["tokens"]


async def test_chat_logprobs() -> None:
    body = {"messages": MESSAGES, "max_tokens": 6, "seed": 10, "logprobs": True, "top_logprobs": 2}
    plain, events = await both_ways("logprobs_chat", CHAT, body)
    (choice,) = plain["choices"]
    assert choice["stop_reason"] is None
    content = choice["logprobs"]["content"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in content)
    streamed = [
        entry
        for c in events[:-1]
        if c["choices"][0]["logprobs"]
        for entry in c["choices"][0]["logprobs"]["content"]
    ]
    assert streamed == content


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT], ids=["completions", "chat"])
async def test_token_ids_and_tokens_as_ids(path: str) -> None:
    body: dict[str, Any] = {
        "max_tokens": 5,
        "seed": 11,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
    }
    if path == COMPLETIONS:
        body.update(prompt="ab", logprobs=2)
    else:
        body.update(messages=MESSAGES, logprobs=True, top_logprobs=2)
    name = f"token_ids_{'completions' if path == COMPLETIONS else 'chat'}"
    plain, events = await both_ways(name, path, body)
    (choice,) = plain["choices"]
    assert choice["stop_reason"] is None
    ids = choice["token_ids"]
    if path == COMPLETIONS:
        assert choice["logprobs"]["tokens"] == [f"token_id:{i}" for i in ids]
    else:
        assert [e["token"] for e in choice["logprobs"]["content"]] == [f"token_id:{i}" for i in ids]
    streamed = [i for c in events[:-1] for i in c["choices"][0].get("token_ids") or []]
    assert streamed == ids


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT], ids=["completions", "chat"])
async def test_diagnostics(path: str) -> None:
    body: dict[str, Any] = {"max_tokens": 6, "seed": 12, "mixing": {"diagnostics": True}}
    if path == COMPLETIONS:
        body["prompt"] = "x"
    else:
        body["messages"] = MESSAGES
    name = f"diagnostics_{'completions' if path == COMPLETIONS else 'chat'}"
    plain, events = await both_ways(name, path, body)
    (choice,) = plain["choices"]
    assert choice["stop_reason"] is None
    diag = choice["diagnostics"]
    chunks = [c["choices"][0] for c in events[:-1]]
    per_token = [c["diagnostics"] for c in chunks if c["finish_reason"] is None]
    assert all("summary" not in d for d in per_token)
    assert [i for d in per_token for i in d["token_ids"]] == diag["token_ids"]
    final = chunks[-1]["diagnostics"]
    assert final["token_ids"] == []
    assert final["summary"] == diag["summary"]


async def test_n_and_several_prompts_completions() -> None:
    body = {"prompt": ["Hello", "Bye"], "n": 2, "max_tokens": 5, "seed": 13}
    plain, events = await both_ways("n2_prompts2_completions", COMPLETIONS, body)
    assert [c["index"] for c in plain["choices"]] == [0, 1, 2, 3]
    for choice in plain["choices"]:
        assert choice["stop_reason"] is None
        mine = [c["choices"][0] for c in events[:-1] if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]


async def test_n_chat_with_usage() -> None:
    body = {
        "messages": MESSAGES,
        "n": 2,
        "max_tokens": 4,
        "seed": 14,
        "stream_options": {"include_usage": True},
    }
    plain = await request(CHAT, {k: v for k, v in body.items() if k != "stream_options"})
    assert plain.status_code == 200
    check_golden("n2_chat.json", plain.content)
    streamed = await request(CHAT, {**body, "stream": True})
    one_id_per_stream(streamed.content)
    check_golden("n2_chat_usage.sse", streamed.content)
    events = payloads(streamed.content)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == plain.json()["usage"]
    for choice in plain.json()["choices"]:
        assert choice["stop_reason"] is None
        mine = [c["choices"][0] for c in events[:-2] if c["choices"][0]["index"] == choice["index"]]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"]["content"] for c in mine) == choice["message"]["content"]


async def test_completions_stream_usage() -> None:
    body = {
        "prompt": ["Hello", "Bye"],
        "max_tokens": 4,
        "seed": 15,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    streamed = await request(COMPLETIONS, body)
    one_id_per_stream(streamed.content)
    check_golden("usage_completions.sse", streamed.content)
    events = payloads(streamed.content)
    usage = events[-2]["usage"]
    assert events[-2]["choices"] == []
    assert usage["prompt_tokens"] == len(encode("Hello")) + len(encode("Bye"))
    finished = finish_chunks(events)
    assert len(finished) == 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# --- upstream failures ---------------------------------------------------------------------


async def test_an_upstream_error_mid_stream_is_one_error_frame_then_done() -> None:
    body = {"prompt": "ab", "max_tokens": 10, "seed": 16, "stream": True, "ignore_eos": True}
    async with gateway(upstream_retries=0) as g:
        g.teacher.faults.status = 500
        g.teacher.faults.status_after = g.teacher.completions_started + 4  # the 5th step
        response = await g.client.post(COMPLETIONS, json=body)
    assert response.status_code == 200
    check_golden("error_mid_stream.sse", response.content)
    events = payloads(response.content)
    assert events[-1] == "[DONE]"
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1
    assert errors[0] is events[-2]
    assert errors[0]["error"]["code"] == "bad_gateway"
    assert len(events) == 4 + 2  # four tokens, the error frame, [DONE]
    assert not finish_chunks(events)


@pytest.mark.parametrize(
    ("status", "expected"), [(500, 502), (503, 503)], ids=["bad_gateway", "unavailable"]
)
async def test_an_upstream_failure_without_stream_is_a_status_and_an_error_body(
    status: int, expected: int
) -> None:
    async with gateway(upstream_retries=0) as g:
        g.base.faults.status = status
        g.base.faults.status_after = g.base.completions_started + 2  # the 3rd step
        response = await g.client.post(
            COMPLETIONS, json={"prompt": "ab", "max_tokens": 10, "seed": 17, "ignore_eos": True}
        )
    assert response.status_code == expected
    check_golden(f"error_non_stream_{status}.json", response.content)
    error = response.json()["error"]
    assert error["code"] == ("bad_gateway" if expected == 502 else "upstream_unavailable")
    assert error["type"] == "upstream_error"


# --- a slow consumer -------------------------------------------------------------------------

SLOW_REQUEST = {"prompt": "ab", "max_tokens": 30, "seed": 18, "stream": True, "ignore_eos": True}
SLOW_TOKENS = 6  # the teacher fails from its 7th per-token call on


def _check_slow_stream(events: list[Any]) -> None:
    assert events[-1] == "[DONE]"
    assert "error" in events[-2]
    assert events[-2]["error"]["code"] == "bad_gateway"
    tokens = events[:-2]
    assert len(tokens) == SLOW_TOKENS  # every token sampled before the error arrives
    assert all("error" not in t and t["choices"][0]["finish_reason"] is None for t in tokens)


async def test_a_slow_asgi_consumer_gets_every_queued_token_then_the_error() -> None:
    """The consumer's `send` sleeps, so the generation runs far ahead and fails while its
    tokens are still queued: they must all go out before the error frame."""
    async with gateway(upstream_retries=0) as g:
        g.teacher.faults.status = 500
        g.teacher.faults.status_after = g.teacher.completions_started + SLOW_TOKENS
        started = g.teacher.completions_started
        body = json.dumps(SLOW_REQUEST).encode()
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": COMPLETIONS,
            "raw_path": COMPLETIONS.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"gw"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 1234),
            "server": ("gw", 80),
            "state": {},
        }
        received = False
        finished = asyncio.Event()
        sent: list[bytes] = []
        failed_before_drain: list[bool] = []

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                assert message["status"] == 200
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    sent.append(chunk)
                    # The upstream already failed while tokens are still to be sent.
                    failed_before_drain.append(
                        g.teacher.completions_started > started + SLOW_TOKENS
                    )
                    await asyncio.sleep(0.05)
                if not message.get("more_body", False):
                    finished.set()

        app: Any = g.app
        async with asyncio.timeout(60):
            await app(scope, receive, send)
    raw = b"".join(sent)
    events = payloads(raw)
    _check_slow_stream(events)
    # The failing call came before the consumer had taken the tokens: the queue was drained.
    assert any(failed_before_drain[: SLOW_TOKENS - 1])


def test_a_slow_http_consumer_gets_every_token_then_the_error() -> None:
    """The same over a real uvicorn, reading one frame at a time with pauses."""
    with serve_pair() as (base_url, teacher_url, _base, teacher):
        settings = Settings(base_url=[base_url], teacher_url=[teacher_url], upstream_retries=0)
        with serve(create_app(settings), lifespan="on", timeout=120) as url:
            teacher.faults.status = 500
            teacher.faults.status_after = teacher.completions_started + SLOW_TOKENS
            events: list[Any] = []
            with (
                httpx.Client(base_url=url, timeout=30) as http,
                http.stream("POST", COMPLETIONS, json=SLOW_REQUEST) as response,
            ):
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        data = line.removeprefix("data: ")
                        events.append(data if data == "[DONE]" else json.loads(data))
                        time.sleep(0.05)
    _check_slow_stream(events)
