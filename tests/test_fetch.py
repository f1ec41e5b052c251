"""Fetching more for one step (certified support): exact logprobs of given ids (vLLM's
`logprob_token_ids`), a larger K, the upstream's --max-logprobs, and the guard against vLLM
0.32's batch bug (a top-K answer spoiled by a concurrent `logprob_token_ids` request)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from app.errors import UpstreamError, UpstreamRejectedError
from app.probes import LOGPROBS_ABOVE_ANY_LIMIT, KindGate, SpoiledAnswerError
from app.settings import Settings
from app.upstream import UpstreamClient
from tests.fakes import FakeVLLM, encode
from tests.fakes.vllm import BASE_URL, TEACHER_URL, VOCAB_SIZE, pair_transport

PROMPT = encode("Hello wor")


class Recorder:
    def __init__(self) -> None:
        self.retries: list[tuple[str, str]] = []

    def upstream_call(self, upstream: str, seconds: float, error: str | None) -> None:
        pass

    def upstream_retry(self, upstream: str, reason: str) -> None:
        self.retries.append((upstream, reason))


def settings(**overrides: Any) -> Settings:
    return Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL], **overrides)


@pytest.fixture
def teacher() -> FakeVLLM:
    return FakeVLLM("teacher", max_logprobs=64)


@pytest.fixture
async def client(teacher: FakeVLLM) -> AsyncIterator[UpstreamClient]:
    transport = pair_transport(teacher=teacher)
    async with UpstreamClient("teacher", [TEACHER_URL], settings(), transport=transport) as c:
        await c.discover()
        yield c


def floored(values: Any) -> Any:
    return np.maximum(values, -9999.0)


# --- token_logprobs --------------------------------------------------------------------------


async def test_token_logprobs_are_the_exact_values(
    client: UpstreamClient, teacher: FakeVLLM
) -> None:
    ids = [258, 5, 100, 2]  # unlikely bytes among them: far outside any top K
    got = await client.token_logprobs(PROMPT, ids)
    assert list(got) == ids  # exactly the ids asked for, not vLLM's sampled id too
    np.testing.assert_allclose([got[i] for i in ids], floored(teacher.logprobs(PROMPT)[ids]))
    body = teacher.requests[-1]
    assert body["logprob_token_ids"] == ids
    assert (body["logprobs"], body["max_tokens"], body["temperature"]) == (1, 1, 0)
    assert body["return_tokens_as_token_ids"] is True
    assert body["prompt"] == PROMPT


async def test_more_than_128_ids_go_in_concurrent_requests(
    client: UpstreamClient, teacher: FakeVLLM
) -> None:
    teacher.faults.latency = 0.05
    ids = list(range(VOCAB_SIZE))
    got = await client.token_logprobs(PROMPT, ids + ids[:10])  # repeated ids are asked once
    assert list(got) == ids
    np.testing.assert_allclose([got[i] for i in ids], floored(teacher.logprobs(PROMPT)))
    sizes = sorted(len(body["logprob_token_ids"]) for body in teacher.requests)
    assert sizes[-3:] == [VOCAB_SIZE - 256, 128, 128]
    assert teacher.max_in_flight == 3


async def test_no_ids_is_no_request(client: UpstreamClient, teacher: FakeVLLM) -> None:
    started = teacher.completions_started
    assert await client.token_logprobs(PROMPT, []) == {}
    assert teacher.completions_started == started


async def test_an_id_outside_the_vocabulary_is_a_400(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamRejectedError, match=r"out-of-vocab token ids. Vocabulary size"):
        await client.token_logprobs(PROMPT, [5, VOCAB_SIZE])


async def test_an_upstream_that_ignores_logprob_token_ids_is_a_clear_502() -> None:
    # vLLM before 0.32 accepts the unknown field and answers its plain top `logprobs`.
    body = {"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"token_id:7": -0.1}]}}]}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    async with UpstreamClient("base", [BASE_URL], settings(), transport=transport) as c:
        with pytest.raises(UpstreamError, match=r"left out 2 of the 2 .* needs vLLM 0.32"):
            await c.token_logprobs([1, 2], [5, 6])


# --- the fake answers like vLLM 0.32 (wording checked against a live 0.32 server) ----------


async def test_the_fake_answers_logprob_token_ids_like_vllm(teacher: FakeVLLM) -> None:
    base = {
        "prompt": PROMPT,
        "max_tokens": 1,
        "temperature": 0,
        "return_tokens_as_token_ids": True,
    }
    transport = httpx.ASGITransport(app=teacher.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as http:

        async def post(**extra: Any) -> httpx.Response:
            return await http.post("/v1/completions", json={**base, **extra})

        # The sampled id first, then exactly the ids; `logprobs` is only required, its value
        # is not even checked against --max-logprobs.
        answer = await post(logprobs=999, logprob_token_ids=[100, 5, 100])
        top = answer.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        sampled = teacher.topk(PROMPT, 1)[0][0]
        assert list(top) == [f"token_id:{sampled}", "token_id:100", "token_id:5"]
        # An empty list is the plain top K.
        answer = await post(logprobs=3, logprob_token_ids=[])
        assert len(answer.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == 3

        errors = {
            "when using `logprob_token_ids`, `logprobs` must be set. "
            "(parameter=logprob_token_ids)": await post(logprob_token_ids=[5]),
            "Requested logprob_token_ids of length 129, which is greater than max allowed: 128 "
            "(parameter=logprob_token_ids, value=129)": await post(
                logprobs=1, logprob_token_ids=list(range(129))
            ),
            "token_id(s) [99999] in logprob_token_ids contain out-of-vocab token ids. "
            f"Vocabulary size: {VOCAB_SIZE} (parameter=logprob_token_ids, value=[99999])": (
                await post(logprobs=1, logprob_token_ids=[99999])
            ),
            "Requested sample logprobs of 65, which is greater than max allowed: 64 "
            "(parameter=logprobs, value=65)": await post(logprobs=65),
        }
        for message, response in errors.items():
            assert response.status_code == 400
            assert response.json()["error"]["message"] == message


async def test_the_fake_has_vllms_batch_bug(teacher: FakeVLLM) -> None:
    """vLLM 0.32 (V1 sampler, vllm-project/vllm PR #51789): a top-K request sharing an engine
    step with a logprob_token_ids request gets the sampled id and id 0 at -inf."""
    teacher.faults.latency = 0.05
    base = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    transport = httpx.ASGITransport(app=teacher.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as http:
        ids, topk = await asyncio.gather(
            http.post("/v1/completions", json={**base, "logprobs": 1, "logprob_token_ids": [9]}),
            http.post("/v1/completions", json={**base, "logprobs": 5}),
        )
    sampled = teacher.topk(PROMPT, 1)[0][0]
    assert ids.json()["choices"][0]["logprobs"]["top_logprobs"][0].keys() == {
        f"token_id:{sampled}",
        "token_id:9",
    }
    assert topk.json()["choices"][0]["logprobs"]["top_logprobs"][0] == {
        f"token_id:{sampled}": pytest.approx(teacher.topk(PROMPT, 1)[0][1]),
        "token_id:0": -9999.0,
    }
    assert teacher.spoiled == 1


# --- the batch bug: own requests never overlap, others' overlaps are asked again -------------


async def test_own_probes_and_id_requests_never_share_a_step(
    client: UpstreamClient, teacher: FakeVLLM
) -> None:
    teacher.faults.latency = 0.02

    async def sequence(seq: int) -> None:
        for step in range(4):
            top = await client.topk([*PROMPT, seq, step], 20, affinity=seq)
            assert len(top) >= 20

    async def fetches() -> None:
        for _ in range(4):
            await client.token_logprobs(PROMPT, [5, 100, 200])
            await asyncio.sleep(0.01)

    await asyncio.gather(*(sequence(seq) for seq in range(4)), fetches())
    assert teacher.ids_started == 4
    assert teacher.spoiled == 0


def completion(top: dict[str, float]) -> dict[str, Any]:
    return {"choices": [{"index": 0, "logprobs": {"top_logprobs": [top]}}]}


SPOILED = completion({"token_id:5": -0.1, "token_id:0": -9999.0})
GOOD = completion({f"token_id:{i}": -0.1 * i for i in range(5, 10)})


async def test_a_spoiled_answer_is_asked_again() -> None:
    answers = [SPOILED, GOOD]
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answers.pop(0)))
    recorder = Recorder()
    async with UpstreamClient(
        "teacher", [TEACHER_URL], settings(), transport=transport, observer=recorder
    ) as c:
        assert list(await c.topk([1, 2], 5)) == [5, 6, 7, 8, 9]
    assert recorder.retries == [("teacher", "spoiled")]


async def test_spoiled_answers_beyond_the_retries_are_a_502() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=SPOILED))
    async with UpstreamClient(
        "teacher", [TEACHER_URL], settings(upstream_retries=1), transport=transport
    ) as c:
        with pytest.raises(SpoiledAnswerError, match="logprobs=5 probe with 2 entries") as info:
            await c.topk([1, 2], 5)
    assert info.value.status == 502


async def test_a_short_answer_without_the_padding_is_not_spoiled() -> None:
    # Fewer than K entries alone is not the bug's signature (e.g. a server with a tiny vocabulary).
    body = completion({"token_id:5": -0.1, "token_id:3": -2.0})
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    async with UpstreamClient("teacher", [TEACHER_URL], settings(), transport=transport) as c:
        assert await c.topk([1], 5) == {5: -0.1, 3: -2.0}


async def test_kind_gate_lets_one_kind_in_at_a_time_and_queues_fairly() -> None:
    gate = KindGate()
    log: list[str] = []
    release = asyncio.Event()

    async def hold(kind: str, name: str, until: asyncio.Event | None = None) -> None:
        async with gate.hold(kind):
            log.append(f"+{name}")
            if until is not None:
                await until.wait()
            await asyncio.sleep(0)
            log.append(f"-{name}")

    first = [asyncio.create_task(hold("topk", n, release)) for n in ("a", "b")]
    await asyncio.sleep(0)
    later = [asyncio.create_task(hold("ids", "c")), asyncio.create_task(hold("topk", "d"))]
    await asyncio.sleep(0.01)
    assert log == ["+a", "+b"]  # same kind together; "d" waits behind the waiting "c"
    release.set()
    await asyncio.gather(*first, *later)
    assert log[2:] == ["-a", "-b", "+c", "-c", "+d", "-d"]


# --- --max-logprobs and a larger K -----------------------------------------------------------


async def test_discover_max_logprobs_reads_the_limit_without_a_forward_pass(
    client: UpstreamClient, teacher: FakeVLLM
) -> None:
    served = teacher.prompts_served
    assert await client.discover_max_logprobs() == 64
    assert client.info is not None
    assert client.info.max_logprobs == 64
    assert teacher.prompts_served == served  # refused before the engine
    assert teacher.requests[-1]["logprobs"] == LOGPROBS_ABOVE_ANY_LIMIT


async def test_max_logprobs_minus_one_is_the_vocabulary_size() -> None:
    fake = FakeVLLM("teacher", max_logprobs=-1)
    transport = pair_transport(teacher=fake)
    async with UpstreamClient("teacher", [TEACHER_URL], settings(), transport=transport) as c:
        assert await c.discover_max_logprobs() == VOCAB_SIZE
        assert len(await c.topk(PROMPT, VOCAB_SIZE)) == VOCAB_SIZE


async def test_max_logprobs_is_the_smallest_over_replicas() -> None:
    fakes = {"http://r0.fake": FakeVLLM(max_logprobs=64), "http://r1.fake": FakeVLLM()}
    transport = pair_transport({url: fake.app for url, fake in fakes.items()})
    async with UpstreamClient("teacher", list(fakes), settings(), transport=transport) as c:
        assert await c.discover_max_logprobs() == 20


async def test_a_server_that_names_no_limit_gives_none() -> None:
    def answer(request: httpx.Request) -> httpx.Response:  # a server with no limit at all
        k = min(json.loads(request.content)["logprobs"], 100)
        return httpx.Response(200, json=completion({f"token_id:{i}": -1.0 for i in range(k)}))

    bodies: list[dict[str, Any]] = []

    def record(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return answer(request)

    transport = httpx.MockTransport(record)
    async with UpstreamClient("teacher", [TEACHER_URL], settings(), transport=transport) as c:
        assert await c.discover_max_logprobs() is None
        await c.check_logprobs([1], 20)  # falls back to a real probe with logprobs=K
    assert [body["logprobs"] for body in bodies] == [LOGPROBS_ABOVE_ANY_LIMIT] * 2 + [20]


async def test_check_logprobs_needs_one_refused_request(
    client: UpstreamClient, teacher: FakeVLLM
) -> None:
    started = teacher.completions_started
    await client.check_logprobs(PROMPT, 64)
    assert teacher.completions_started == started + 1
    assert client.info is not None
    assert client.info.max_logprobs == 64


async def test_topk_takes_a_larger_k_than_configured(client: UpstreamClient) -> None:
    assert len(await client.topk(PROMPT, 64)) >= 64  # configured K is 20
    with pytest.raises(UpstreamRejectedError, match=r"mixing.top_k=65 .* limit of 64"):
        await client.topk(PROMPT, 65)
