"""The generation loop against the fake vLLM pair (tests/fakes), in process."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from app.coordinator import (
    ChatMessage,
    Coordinator,
    DualPrompt,
    Event,
    FinishEvent,
    GenerationParams,
    StartupError,
    TokenEvent,
    diagnostics_summary,
)
from app.errors import (
    ContextLengthError,
    InvalidRequestError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)
from app.sampling.types import MixConfig, StepResult
from app.settings import Settings
from tests.fakes import (
    EOS_ID,
    FakeVLLM,
    apply_chat_template,
    decode,
    encode,
    scripted,
    serve_pair,
)
from tests.fakes.vllm import BASE_URL, TEACHER_URL, contexts, pair_transport

PROMPT_TEXT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"
PROMPT = DualPrompt(teacher=encode(PROMPT_TEXT), base=encode("Question: Say something\nAnswer:"))

CoordinatorFactory = Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"base_url": [BASE_URL], "teacher_url": [TEACHER_URL]}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def base() -> FakeVLLM:
    return FakeVLLM("base")


@pytest.fixture
def teacher() -> FakeVLLM:
    return FakeVLLM("teacher")


@pytest.fixture
def coordinator(base: FakeVLLM, teacher: FakeVLLM) -> CoordinatorFactory:
    """`async with coordinator(**settings) as coord`: a started coordinator on the fakes."""

    @contextlib.asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[Coordinator]:
        transport = overrides.pop("transport", None) or pair_transport(base=base, teacher=teacher)
        observer = overrides.pop("observer", None)
        coord = Coordinator(settings(**overrides), observer=observer, transport=transport)
        async with coord:
            yield coord

    return make


DEADLINE = 20.0  # seconds: generous, for a loaded machine


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` (the fakes' counters) until it holds; fail after DEADLINE seconds.
    A generous deadline instead of a fixed short sleep: a loaded machine may be slow."""
    async with asyncio.timeout(DEADLINE):
        while not condition():  # noqa: ASYNC110 - polling plain counters of the fakes
            await asyncio.sleep(0.005)


def script_both(base: FakeVLLM, teacher: FakeVLLM, text: str, *, then: int = EOS_ID) -> None:
    """Both fakes continue (near-certainly) with `text`, then `then`."""
    base.distribution = scripted(encode(text), then=then)
    teacher.distribution = scripted(encode(text), then=then)


async def collect(coord: Coordinator, params: GenerationParams) -> list[Event]:
    return [event async for event in coord.stream([PROMPT], params)]


def texts(events: list[Event], index: int = 0) -> list[str]:
    return [e.text for e in events if e.index == index]


# --- start-up ----------------------------------------------------------------------------------


async def test_startup_discovers_models_and_eos(
    coordinator: CoordinatorFactory, teacher: FakeVLLM
) -> None:
    async with coordinator() as coord:
        assert coord.models["teacher"].name == "fake-teacher"
        assert coord.models["base"].max_model_len == 2048
        assert coord.eos_token_ids == frozenset({EOS_ID})
        assert await coord.ready() is True
        teacher.faults.health_status = 503
        assert await coord.ready() is False
    assert teacher.calls["/tokenizer_info"] == 1


async def test_startup_eos_from_settings_skips_tokenizer_info(
    coordinator: CoordinatorFactory, teacher: FakeVLLM
) -> None:
    teacher.faults.tokenizer_info = False
    async with coordinator(eos_token_ids=[7, 9]) as coord:
        assert coord.eos_token_ids == frozenset({7, 9})
    assert teacher.calls["/tokenizer_info"] == 0


async def test_startup_refuses_without_eos(
    coordinator: CoordinatorFactory, teacher: FakeVLLM
) -> None:
    teacher.faults.tokenizer_info = False
    with pytest.raises(StartupError, match="DUAL_VLLM_EOS_TOKEN_IDS") as info:
        async with coordinator():
            pass
    assert "--enable-tokenizer-info-endpoint" in str(info.value)


async def test_startup_refuses_different_tokenizers(
    coordinator: CoordinatorFactory, base: FakeVLLM
) -> None:
    base.faults.tokenize_shift = 1
    with pytest.raises(StartupError, match="tokenizers disagree"):
        async with coordinator():
            pass


async def test_startup_refuses_k_above_max_logprobs(coordinator: CoordinatorFactory) -> None:
    with pytest.raises(StartupError, match=r"allows at most 20 logprobs.*--max-logprobs 32"):
        async with coordinator(top_k=32):
            pass


async def test_startup_refuses_unreachable_upstream(base: FakeVLLM) -> None:
    # Only the base is routed: the teacher's URL raises ConnectError (after the retries).
    coord = Coordinator(
        settings(upstream_retries=0, startup_timeout=0),
        transport=pair_transport({BASE_URL: base.app}),
    )
    with pytest.raises(StartupError, match=r"teacher upstream .*unreachable.*TEACHER_URL"):
        async with coord:
            pass


async def test_startup_refuses_unknown_model_name(coordinator: CoordinatorFactory) -> None:
    with pytest.raises(StartupError, match=r"does not serve model 'nope'.*BASE_MODEL"):
        async with coordinator(base_model="nope"):
            pass


async def test_startup_refuses_broken_models_endpoint(
    coordinator: CoordinatorFactory, base: FakeVLLM
) -> None:
    base.faults.models_status = 500
    with pytest.raises(StartupError, match="base upstream"):
        async with coordinator(startup_timeout=0):
            pass


# --- stop rules ----------------------------------------------------------------------------------


async def test_eos_stops_and_its_text_is_not_included(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    script_both(base, teacher, "hi there")
    async with coordinator() as coord:
        [result] = await coord.generate([PROMPT], GenerationParams(max_tokens=50))
    assert result.token_ids == [*encode("hi there"), EOS_ID]
    assert result.text == "hi there"
    assert (result.finish_reason, result.stop_reason) == ("stop", None)
    assert result.completion_tokens == len(result.token_ids) == len(result.steps)
    assert result.prompt_tokens == len(PROMPT.teacher)


async def test_ignore_eos_runs_to_max_tokens(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    script_both(base, teacher, "ab")
    async with coordinator() as coord:
        [result] = await coord.generate([PROMPT], GenerationParams(max_tokens=6, ignore_eos=True))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 6
    assert result.token_ids[:3] == [*encode("ab"), EOS_ID]
    # skip_special_tokens (vLLM's default): the EOS generated under ignore_eos adds no text.
    assert result.text == decode([i for i in result.token_ids if i != EOS_ID])
    assert "<|im_end|>" not in result.text
    async with coordinator() as coord:
        params = GenerationParams(max_tokens=6, ignore_eos=True, skip_special_tokens=False)
        for incremental in (False, True):
            [kept] = await coord.generate([PROMPT], params, token_text=incremental)
            assert kept.text == decode(kept.token_ids)
            assert "<|im_end|>" in kept.text


@pytest.mark.parametrize(("include", "expected"), [(False, "a"), (True, "ab")])
async def test_stop_token_ids(
    coordinator: CoordinatorFactory,
    base: FakeVLLM,
    teacher: FakeVLLM,
    include: bool,
    expected: str,
) -> None:
    script_both(base, teacher, "abcd")
    stop_id = encode("b")[0]
    params = GenerationParams(
        max_tokens=50, stop_token_ids=[stop_id], include_stop_str_in_output=include
    )
    async with coordinator() as coord:
        [result] = await coord.generate([PROMPT], params)
        events = await collect(coord, params)
    assert result.token_ids == encode("ab")
    assert (result.finish_reason, result.stop_reason) == ("stop", stop_id)
    assert result.text == expected
    assert "".join(texts(events)) == expected
    finish = events[-1]
    assert isinstance(finish, FinishEvent)
    assert finish.stop_reason == stop_id


@pytest.mark.parametrize(
    ("include", "expected"), [(False, "hel"), (True, "hello w")], ids=["cut", "included"]
)
async def test_stop_string(
    coordinator: CoordinatorFactory,
    base: FakeVLLM,
    teacher: FakeVLLM,
    include: bool,
    expected: str,
) -> None:
    script_both(base, teacher, "hello world and more")
    params = GenerationParams(
        max_tokens=50, stop=["xyz", "lo w"], include_stop_str_in_output=include
    )
    async with coordinator() as coord:
        [result] = await coord.generate([PROMPT], params)
        events = await collect(coord, params)
    assert (result.finish_reason, result.stop_reason) == ("stop", "lo w")
    assert result.text == expected
    # The token that completed the stop string is generated; nothing after it.
    assert result.token_ids == encode("hello w")
    assert "".join(texts(events)) == expected
    # Nothing of the stop string is released before it is known not to be one.
    released = ""
    for event in events:
        released += event.text
        assert expected.startswith(released)


async def test_stop_string_made_of_a_multibyte_character(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    script_both(base, teacher, "café au lait")
    params = GenerationParams(max_tokens=50, stop=["é"])
    async with coordinator() as coord:
        events = await collect(coord, params)
    assert "".join(texts(events)) == "caf"
    finish = events[-1]
    assert isinstance(finish, FinishEvent)
    assert (finish.finish_reason, finish.stop_reason) == ("stop", "é")
    assert finish.completion_tokens == len(encode("café"))


async def test_max_tokens(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    base.eos_after = teacher.eos_after = None
    async with coordinator() as coord:
        results = await coord.generate([PROMPT], GenerationParams(max_tokens=7, n=2, seed=3))
    for result in results:
        assert (result.finish_reason, result.stop_reason) == ("length", None)
        assert result.completion_tokens == len(result.token_ids) == 7
        assert result.text == decode(result.token_ids)


async def test_context_length_ends_with_length(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    base.eos_after = teacher.eos_after = None
    teacher.max_model_len = len(PROMPT.teacher) + 5
    base.max_model_len = len(PROMPT.base) + 9
    async with coordinator() as coord:
        [result] = await coord.generate([PROMPT], GenerationParams(max_tokens=None))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 5  # the smaller room of the two
    # Every probe fit the upstream's limit.
    assert max(len(body["prompt"]) for body in teacher.requests) < teacher.max_model_len


async def test_prompt_at_the_context_limit_is_refused(
    coordinator: CoordinatorFactory, teacher: FakeVLLM
) -> None:
    teacher.max_model_len = len(PROMPT.teacher)
    async with coordinator() as coord:
        with pytest.raises(ContextLengthError) as info:
            coord.stream([PROMPT], GenerationParams())
    assert info.value.status == 400
    assert info.value.kind.code == "context_length_exceeded"
    assert teacher.completions_started == 1  # only the start-up probe


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (GenerationParams(n=0), "n"),
        (GenerationParams(max_tokens=0), "max_tokens"),
        (GenerationParams(logprobs=21), "logprobs"),
        (GenerationParams(top_k_upstream=0), "mixing.top_k"),
        (GenerationParams(mixing=MixConfig(alpha=1.5)), "mixing"),
        (GenerationParams(n=65), "n"),
    ],
)
async def test_invalid_params_are_400s(
    coordinator: CoordinatorFactory, params: GenerationParams, param: str
) -> None:
    async with coordinator() as coord:
        with pytest.raises(InvalidRequestError) as info:
            await coord.generate([PROMPT], params)
    assert info.value.param == param
    assert info.value.status == 400


# --- text ----------------------------------------------------------------------------------------


async def test_utf8_deltas_never_split_a_character(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    script_both(base, teacher, "a€bé!")
    async with coordinator() as coord:
        events = await collect(coord, GenerationParams(max_tokens=50))
    deltas = texts(events)
    assert "".join(deltas) == "a€bé!"
    assert all("\ufffd" not in d for d in deltas)
    # One event per token; the character arrives with its last byte.
    assert deltas == ["a", "", "", "€", "b", "", "é", "!", "", ""]  # ..., EOS, finish
    assert isinstance(events[-1], FinishEvent)
    assert events[-1].text == ""


async def test_text_equals_detokenized_ids(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    async with coordinator() as coord:
        results = await coord.generate([PROMPT], GenerationParams(max_tokens=40, n=4, seed=11))
        events = await collect(coord, GenerationParams(max_tokens=40, n=4, seed=11))
    for result in results:
        ids = result.token_ids[:-1] if result.token_ids[-1] == EOS_ID else result.token_ids
        assert result.text == decode(ids)
        assert result.text  # the fake writes something before its EOS
        # Streaming gives the same text, split into deltas.
        assert "".join(texts(events, result.index)) == result.text


async def test_generate_skips_incremental_detokenization(
    coordinator: CoordinatorFactory, teacher: FakeVLLM
) -> None:
    async with coordinator() as coord:
        results = await coord.generate([PROMPT], GenerationParams(max_tokens=10, n=2, seed=1))
    # One /detokenize per choice at the end, none per token (no stop strings, no stream).
    assert teacher.calls["/detokenize"] == len(results)
    async with coordinator() as coord:
        events = await collect(coord, GenerationParams(max_tokens=10, seed=1))
    tokens = sum(isinstance(e, TokenEvent) for e in events)
    assert teacher.calls["/detokenize"] - len(results) >= tokens - 1


# --- the math in the loop -------------------------------------------------------------------------


async def test_diagnostics_are_consistent(coordinator: CoordinatorFactory) -> None:
    async with coordinator() as coord:
        results = await coord.generate([PROMPT], GenerationParams(max_tokens=30, n=3, seed=5))
    steps: list[StepResult] = [s for r in results for s in r.steps]
    assert len(steps) > 20
    for result in results:
        first = result.steps[0]
        assert (first.alpha, first.reason) == (1.0, "first_token")
        assert [s.token_id for s in result.steps] == result.token_ids
    for step in steps:
        if step.alpha is not None:
            assert 0.0 <= step.alpha <= 1.0
        if step.reason == "solved":
            assert step.kl_gap <= 1e-9
        assert math.isfinite(step.logprob)
        assert step.logprob <= 0.0
    assert any(s.reason == "solved" for s in steps)
    summary = results[0].summary
    alphas = [s.alpha for s in results[0].steps if s.alpha is not None]
    assert summary["tokens"] == len(results[0].steps)
    assert summary["alpha_mean"] == pytest.approx(float(np.mean(alphas)))
    assert diagnostics_summary([]) == {
        "alpha_mean": None,
        "fallback_rate": 0.0,
        "tokens": 0,
        "acceptance_rate": None,
        "tokens_per_round": None,
        "requests_per_token": None,
    }


async def test_first_token_follows_the_teacher(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    """With forcing on, the first token is drawn from the teacher alone: its top-K over the
    union support, missing ids filled (docs/ALGORITHM.md §1, §5.1; trust region off). Compare
    frequencies over many choices with that distribution, computed here from the fakes."""
    mixing = MixConfig(trust_region_top_p=None)
    draws = 400
    async with coordinator(max_n=draws) as coord:
        results = await coord.generate(
            [PROMPT], GenerationParams(max_tokens=1, n=draws, seed=2, mixing=mixing)
        )
    known = {i: math.exp(lp) for i, lp in teacher.topk(PROMPT.teacher, 20)}
    support = set(known) | {i for i, _ in base.topk(PROMPT.base, 20)}
    missing = support - set(known)
    tail = max(1.0 - sum(known.values()), 0.0)
    fill = max(min(min(known.values()), tail / len(missing)), 1e-10) if missing else 0.0
    weights = {i: known.get(i, fill) for i in support}
    total = sum(weights.values())
    counts: dict[int, int] = {}
    for r in results:
        assert (r.steps[0].alpha, r.steps[0].reason) == (1.0, "first_token")
        counts[r.token_ids[0]] = counts.get(r.token_ids[0], 0) + 1
    assert set(counts) <= support
    # Pearson's chi-square, ids expected fewer than 5 times pooled into one bin.
    expected_counts = {i: draws * w / total for i, w in weights.items()}
    big = [i for i, e in expected_counts.items() if e >= 5]
    bins = [(counts.get(i, 0), expected_counts[i]) for i in big]
    rest = [i for i in expected_counts if i not in big]
    bins.append((sum(counts.get(i, 0) for i in rest), sum(expected_counts[i] for i in rest)))
    chi2 = sum((c - e) ** 2 / e for c, e in bins if e > 0)
    # df <= 30: chi2 > 80 has probability < 1e-6 under the null.
    assert len(big) >= 5
    assert chi2 < 80, chi2
    # And a teacher's favourite is drawn about as often as the teacher says.
    top_id = max(known, key=lambda i: known[i])
    expected = draws * weights[top_id] / total
    assert abs(counts.get(top_id, 0) - expected) <= 4 * math.sqrt(expected) + 1


async def test_same_seed_same_tokens(coordinator: CoordinatorFactory) -> None:
    params = GenerationParams(max_tokens=20, n=3, seed=1234)
    async with coordinator() as coord:
        first = await coord.generate([PROMPT, PROMPT], params)
        second = await coord.generate([PROMPT, PROMPT], params)
        other = await coord.generate([PROMPT, PROMPT], GenerationParams(max_tokens=20, n=3, seed=9))
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    assert [r.token_ids for r in first] != [r.token_ids for r in other]
    # Choices of one request differ (independent child generators).
    assert len({tuple(r.token_ids) for r in first[:3]}) > 1


async def test_choices_are_in_openai_order(coordinator: CoordinatorFactory) -> None:
    other = DualPrompt(teacher=encode("Zebra? "), base=encode("Zebra? "))
    async with coordinator() as coord:
        results = await coord.generate([PROMPT, other], GenerationParams(max_tokens=3, n=2))
    assert [(r.index, r.prompt_index) for r in results] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert [r.prompt_tokens for r in results] == [len(PROMPT.teacher)] * 2 + [7, 7]


async def test_logprobs_of_q(coordinator: CoordinatorFactory) -> None:
    async with coordinator() as coord:
        [result] = await coord.generate([PROMPT], GenerationParams(max_tokens=5, logprobs=3))
        [plain] = await coord.generate([PROMPT], GenerationParams(max_tokens=5))
    assert plain.top_logprobs is None
    assert result.top_logprobs is not None
    assert len(result.top_logprobs) == len(result.steps)
    for step, top in zip(result.steps, result.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        if step.token_id in top:
            assert top[step.token_id] == pytest.approx(step.logprob)


async def test_probe_requests_are_token_ids(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    script_both(base, teacher, "ok")
    async with coordinator() as coord:
        await coord.generate([PROMPT], GenerationParams(max_tokens=5))
    probes = list(teacher.requests)[1:]  # after the start-up probe
    assert [p["prompt"] for p in probes] == [
        PROMPT.teacher,
        [*PROMPT.teacher, *encode("o")],
        [*PROMPT.teacher, *encode("ok")],
    ]
    assert [p["prompt"] for p in list(base.requests)[1:]][-1] == [*PROMPT.base, *encode("ok")]
    body = probes[0]
    assert body["max_tokens"] == 1
    assert body["logprobs"] == 20
    assert body["temperature"] == 0
    assert body["return_tokens_as_token_ids"] is True
    assert body["stream"] is False
    assert body["model"] == "fake-teacher"


async def test_k_plus_one_entries_are_used(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    teacher.faults.k_plus_one = True
    async with coordinator() as coord:
        [result] = await coord.generate(
            [PROMPT], GenerationParams(max_tokens=1, mixing=MixConfig(trust_region_top_p=None))
        )
    # The (K+1)-th id the teacher sent first is part of the support, with its own value.
    extra = teacher.topk(PROMPT.teacher, 21)[-1][0]
    step = result.steps[0]
    assert extra in step.support.tolist()
    assert step.support_size == len(step.support) >= 21


# --- prompts -------------------------------------------------------------------------------------


async def test_chat_prompt_uses_each_models_template(coordinator: CoordinatorFactory) -> None:
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi?")]
    async with coordinator() as coord:
        prompt = await coord.chat_prompt(messages)
        only_base = await coord.chat_prompt(messages, base_prompt="Q: Hi?\nA:")
        ids = await coord.chat_prompt(messages, base_prompt=[5, 6, 7])
        other = await coord.chat_prompt(messages, base_messages=[ChatMessage("user", "Yo")])
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert prompt.teacher == encode(apply_chat_template(chat, True))
    assert prompt.base == encode("Be brief.\n\nQuestion: Hi?\nAnswer:")
    assert only_base.base == encode("Q: Hi?\nA:")
    assert ids.base == [5, 6, 7]
    assert other.base == encode("Question: Yo\nAnswer:")


async def test_completion_prompts_shapes(coordinator: CoordinatorFactory) -> None:
    async with coordinator() as coord:
        single = await coord.completion_prompts("abc")
        listed = await coord.completion_prompts(["abc", "de"], base_prompt=["x", "y"])
        ids = await coord.completion_prompts([[5, 6], [7]], base_prompt=[[8], [9]])
        flat = await coord.completion_prompts([5, 6, 7])
        with pytest.raises(InvalidRequestError) as mismatch:
            await coord.completion_prompts(["a", "b"], base_prompt=["a"])
        with pytest.raises(InvalidRequestError):
            await coord.completion_prompts([])
        with pytest.raises(InvalidRequestError):
            await coord.completion_prompts([[1], [-2]])
    assert single == [DualPrompt(teacher=encode("abc"), base=encode("abc"))]
    assert [p.base for p in listed] == [encode("x"), encode("y")]
    assert [p.teacher for p in listed] == [encode("abc"), encode("de")]
    assert ids == [DualPrompt([5, 6], [8]), DualPrompt([7], [9])]
    assert flat == [DualPrompt([5, 6, 7], [5, 6, 7])]
    assert mismatch.value.param == "base_prompt"


# --- concurrency, errors, cancellation -----------------------------------------------------------


async def test_concurrency_is_bounded(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    base.eos_after = teacher.eos_after = None
    # Slow calls until both slots are seen busy at once (however slow the machine is), then
    # fast: the bound must hold for the whole request.
    teacher.faults.latency = 0.3
    async with coordinator(max_concurrent_sequences=2) as coord:
        work = asyncio.create_task(coord.generate([PROMPT], GenerationParams(max_tokens=4, n=6)))
        await until(lambda: teacher.prompts_in_flight == 2)
        teacher.faults.latency = 0.0
        results = await work
    assert len(results) == 6
    assert teacher.max_prompts_in_flight == 2


async def test_sequences_run_concurrently(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    base.eos_after = teacher.eos_after = None
    # Slow calls until all eight sequences are seen calling each upstream at once.
    teacher.faults.latency = base.faults.latency = 0.5
    async with coordinator() as coord:
        work = asyncio.create_task(
            coord.generate([PROMPT, PROMPT], GenerationParams(max_tokens=3, n=4))
        )
        await until(lambda: teacher.prompts_in_flight == 8 and base.prompts_in_flight == 8)
        teacher.faults.latency = base.faults.latency = 0.0
        await work
    assert teacher.max_prompts_in_flight == 8
    assert base.max_prompts_in_flight == 8


async def test_upstream_dying_mid_generation_fails_the_request(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    base.eos_after = teacher.eos_after = None
    async with coordinator() as coord:
        teacher.faults.status = 500
        teacher.faults.status_after = teacher.completions_started + 3
        base.faults.latency = 0.5  # the base call is in flight when the teacher fails
        with pytest.raises(UpstreamError) as info:
            await coord.generate([PROMPT], GenerationParams(max_tokens=20))
        assert type(info.value) is UpstreamError
        assert info.value.status == 502
        assert info.value.upstream == "teacher"
        # The sibling base call was cancelled, not awaited to completion.
        assert base.completions_cancelled >= 1
        assert base.in_flight == 0


async def test_upstream_rejection_is_a_400_with_its_message(
    coordinator: CoordinatorFactory, teacher: FakeVLLM
) -> None:
    async with coordinator() as coord:
        teacher.faults.status = 400
        teacher.faults.status_message = "Token id 99999 is out of vocabulary"
        with pytest.raises(UpstreamRejectedError, match="out of vocabulary") as info:
            await coord.generate([PROMPT], GenerationParams())
    assert info.value.status == 400


async def test_upstream_503_is_retried_then_succeeds(
    coordinator: CoordinatorFactory, teacher: FakeVLLM
) -> None:
    async with coordinator() as coord:
        teacher.faults.status = 503
        teacher.faults.status_after = teacher.completions_started
        teacher.faults.status_count = 2
        [result] = await coord.generate([PROMPT], GenerationParams(max_tokens=3))
    assert result.completion_tokens >= 1


async def test_upstream_503_beyond_retries_is_unavailable(
    coordinator: CoordinatorFactory, teacher: FakeVLLM
) -> None:
    async with coordinator(upstream_retries=1) as coord:
        teacher.faults.status = 503
        with pytest.raises(UpstreamUnavailableError) as info:
            await coord.generate([PROMPT], GenerationParams(max_tokens=3))
    assert info.value.status == 503


async def test_malformed_body_is_a_502(coordinator: CoordinatorFactory, teacher: FakeVLLM) -> None:
    async with coordinator() as coord:
        teacher.faults.malformed = "not_json"
        with pytest.raises(UpstreamError, match="not JSON") as info:
            await coord.generate([PROMPT], GenerationParams())
    assert info.value.status == 502


async def test_cancelling_the_consumer_stops_upstream_calls(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    base.eos_after = teacher.eos_after = None
    base.faults.latency = teacher.faults.latency = 0.02
    seen: list[Event] = []
    async with coordinator() as coord:

        async def consume() -> None:
            async for event in coord.stream([PROMPT], GenerationParams(max_tokens=500, n=3)):
                seen.append(event)

        task = asyncio.create_task(consume())
        async with asyncio.timeout(10):
            while len(seen) < 6:  # noqa: ASYNC110 - polling a plain list the consumer fills
                await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: teacher.in_flight == base.in_flight == 0)
        started = teacher.completions_started + base.completions_started
        await asyncio.sleep(0.15)  # no new call starts afterwards
        assert teacher.completions_started + base.completions_started == started
        assert teacher.in_flight == base.in_flight == 0
    assert len(seen) < 30


async def test_breaking_out_of_the_stream_stops_upstream_calls(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    base.eos_after = teacher.eos_after = None
    teacher.faults.latency = 0.01
    async with coordinator() as coord:
        events = coord.stream([PROMPT], GenerationParams(max_tokens=500))
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, TokenEvent) and len(event.text) >= 0:
                    break
        await until(lambda: teacher.in_flight == 0)
        started = teacher.completions_started
        await asyncio.sleep(0.1)  # no new call starts afterwards
        assert teacher.completions_started == started
        assert teacher.in_flight == 0


async def test_replicas_keep_a_sequence_on_one_replica(teacher: FakeVLLM) -> None:
    replica_a, replica_b = FakeVLLM("base"), FakeVLLM("base")
    urls = ["http://base-a.fake", "http://base-b.fake"]
    transport = pair_transport(
        {urls[0]: replica_a.app, urls[1]: replica_b.app, TEACHER_URL: teacher.app}
    )
    coord = Coordinator(settings(base_url=urls), transport=transport)
    async with coord:
        results = await coord.generate([PROMPT], GenerationParams(max_tokens=6, n=4, seed=1))
    prompts_a = [c for r in list(replica_a.requests)[1:] for c in contexts(r)]
    prompts_b = [c for r in list(replica_b.requests)[1:] for c in contexts(r)]
    assert prompts_a
    assert prompts_b
    for result in results:
        context = tuple(PROMPT.base) + tuple(result.token_ids[:-1])
        assert (context in prompts_a) != (context in prompts_b)  # exactly one replica


async def test_observer_sees_calls_and_steps(coordinator: CoordinatorFactory) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str | None]] = []
            self.steps: list[StepResult] = []

        def upstream_call(self, upstream: str, seconds: float, error: str | None) -> None:
            assert seconds >= 0
            self.calls.append((upstream, error))

        def step(self, result: StepResult, seconds: float) -> None:
            assert seconds >= 0
            self.steps.append(result)

    recorder = Recorder()
    async with coordinator(observer=recorder) as coord:
        [result] = await coord.generate([PROMPT], GenerationParams(max_tokens=5))
    assert recorder.steps[-len(result.steps) :] == result.steps
    assert {u for u, _ in recorder.calls} == {"base", "teacher"}
    assert all(error is None for _, error in recorder.calls)


async def test_not_started_coordinator_refuses(base: FakeVLLM, teacher: FakeVLLM) -> None:
    coord = Coordinator(settings(), transport=pair_transport(base=base, teacher=teacher))
    assert await coord.ready() is False
    with pytest.raises(RuntimeError, match="not started"):
        await coord.generate([PROMPT], GenerationParams())


async def test_stream_delivers_events_then_the_error(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    base.eos_after = teacher.eos_after = None
    seen: list[Event] = []
    async with coordinator() as coord:
        teacher.faults.status = 504
        teacher.faults.status_after = teacher.completions_started + 4

        async def consume() -> None:
            async for event in coord.stream([PROMPT], GenerationParams(max_tokens=50)):
                seen.append(event)

        with pytest.raises(UpstreamError, match=r"upstream error \(504\)"):
            await consume()
    assert [type(e) for e in seen] == [TokenEvent] * 4


async def test_over_real_http_with_the_served_fakes() -> None:
    """tests.fakes.serve_pair: both fakes behind real uvicorn servers on free ports."""
    with serve_pair() as (base_url, teacher_url, base, teacher):
        script_both(base, teacher, "real")
        coord = Coordinator(settings(base_url=[base_url], teacher_url=[teacher_url]))
        async with coord:
            [result] = await coord.generate([PROMPT], GenerationParams(max_tokens=9))
            assert await coord.ready() is True
    assert result.text == "real"
    assert result.finish_reason == "stop"
    assert teacher.completions_finished == 1 + len(result.token_ids)


async def test_min_tokens_never_ends_early_and_a_banned_id_never_appears(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    """docs/ALGORITHM.md §5a through the loop: EOS is near-certain after "ab" (the trust region
    keeps it alone), min_tokens holds it back; a -100 bias on the scripted "b" bans it."""
    script_both(base, teacher, "ab")
    async with coordinator() as coord:
        results = await coord.generate(
            [PROMPT], GenerationParams(max_tokens=12, min_tokens=6, n=4, seed=1)
        )
        for result in results:
            assert result.completion_tokens >= 6
            assert EOS_ID not in result.token_ids[:6]
        b = encode("b")[0]
        banned = GenerationParams(
            max_tokens=6, n=4, seed=2, mixing=MixConfig(logit_bias=((b, -100.0),))
        )
        for result in await coord.generate([PROMPT], banned):
            assert b not in result.token_ids


async def test_special_ids_come_from_tokenizer_info_and_eos(
    coordinator: CoordinatorFactory,
) -> None:
    async with coordinator() as coord:
        # The fake's added_tokens_decoder marks <|endoftext|>, <|im_start|>, <|im_end|> special.
        assert coord.pair.special_ids == {0, 1, 2}
        assert EOS_ID in coord.pair.special_ids


async def test_min_tokens_holds_stop_strings_back_as_vllm_does(
    coordinator: CoordinatorFactory, base: FakeVLLM, teacher: FakeVLLM
) -> None:
    """vLLM matches stop strings only once min_tokens tokens are out, and only those ending in
    the text after them: "b" inside the first 3 tokens does not stop; the next "b" does."""
    script_both(base, teacher, "abcabcabc")
    async with coordinator() as coord:
        [early] = await coord.generate([PROMPT], GenerationParams(max_tokens=9, stop=["b"]))
        assert (early.text, early.stop_reason) == ("a", "b")
        params = GenerationParams(max_tokens=9, stop=["b"], min_tokens=3)
        [held] = await coord.generate([PROMPT], params)
        assert (held.text, held.stop_reason) == ("abca", "b")
        assert held.completion_tokens == 5
