"""app/render: the response builders (logprobs, diagnostics, usage) and the renderers of both
families, body and stream chunks. No I/O."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from app.generation import Completion, FinishEvent, TokenEvent
from app.render import ChatRenderer, CompletionRenderer, RenderOptions
from app.render.chat import chat_logprobs
from app.render.common import (
    LOGPROB_FLOOR,
    diagnostics,
    ranked_logprobs,
    usage,
)
from app.render.completions import completion_logprobs, completion_top_logprobs, text_offsets
from app.sampling.types import StepResult


def step(
    token_id: int, *, alpha: float | None = 0.5, reason: str = "solved", logprob: float = -0.5
) -> StepResult:
    return StepResult(
        token_id=token_id,
        logprob=logprob,
        alpha=alpha,
        reason=reason,  # type: ignore[arg-type]
        js=0.1,
        overlap_count=3,
        overlap_mass=0.9,
        kl_gap=float("nan"),
        chernoff=float("inf"),
        support_size=4,
        filled_mass=0.0,
        support=np.array([token_id], dtype=np.int64),
        logq=np.array([logprob]),
    )


def options(**overrides: object) -> RenderOptions:
    values: dict[str, object] = {
        "model": "m",
        "n": 1,
        "logprobs": None,
        "token_ids_as_strings": False,
        "diagnostics": False,
        "include_usage": False,
        "return_token_ids": False,
    }
    values.update(overrides)
    return RenderOptions(**values)  # type: ignore[arg-type]


# --- builders ------------------------------------------------------------------------------


def test_ranked_logprobs_put_the_sampled_token_first_without_repeating_it() -> None:
    ranked = ranked_logprobs(5, -2.0, {1: -0.1, 5: -2.0, 3: -1.0})
    assert ranked == [(5, -2.0), (1, -0.1), (3, -1.0)]


def test_colliding_token_texts_keep_every_entry() -> None:
    # Two ids decoding to the same text (partial UTF-8 bytes) must not overwrite each other.
    texts = {10: "\ufffd", 11: "\ufffd", 12: "a"}
    top = completion_top_logprobs([(10, -0.5), (11, -1.0), (12, -math.inf)], texts, n=2)
    assert top == {"\ufffd": -0.5, "token_id:11": -1.0, "a": LOGPROB_FLOOR}
    assert completion_top_logprobs([(10, -0.5), (11, -1.0)], None, n=0) == {"token_id:10": -0.5}


def test_completion_logprobs_shape() -> None:
    result = completion_logprobs(
        [1, 2], [-0.1, -0.2], [{1: -0.1, 3: -0.3}, None], [0, 1], {1: "a", 2: "b", 3: "c"}, 1
    )
    assert result.tokens == ["a", "b"]
    assert result.token_logprobs == [-0.1, -0.2]
    assert result.top_logprobs == [{"a": -0.1, "c": -0.3}, {"b": -0.2}]
    assert result.text_offset == [0, 1]


def test_chat_logprobs_list_top_n_and_bytes() -> None:
    result = chat_logprobs([2], [-0.7], [{1: -0.1, 2: -0.7, 3: -2.0}], {1: "é"}, 2)
    assert result.content is not None
    entry = result.content[0]
    assert entry.token == "token_id:2"  # no text known: vLLM's convention
    assert [t.token for t in entry.top_logprobs] == ["é", "token_id:2"]
    assert entry.top_logprobs[0].bytes == list("é".encode())


def test_diagnostics_are_json_safe_and_summarised() -> None:
    steps = [step(1, alpha=1.0, reason="first_token"), step(2, reason="unstable", alpha=1.0)]
    steps.append(step(3, alpha=None, reason="single_token"))
    diag = diagnostics(steps, summary=True)
    assert diag.kl_gap == [None, None, None]  # NaN -> null
    assert diag.chernoff == [None, None, None]  # inf -> null
    assert diag.alpha == [1.0, 1.0, None]
    assert diag.summary is not None
    assert diag.summary.tokens == 3
    assert diag.summary.alpha_mean == 1.0
    assert diag.summary.fallback_rate == pytest.approx(1 / 3)
    assert "summary" not in diagnostics(steps, summary=False).model_dump()


def test_usage_counts_each_prompt_once() -> None:
    result = usage({0: 5, 1: 7}, 12)
    assert (result.prompt_tokens, result.completion_tokens, result.total_tokens) == (12, 12, 24)


def test_text_offsets_count_token_strings_and_end_where_the_next_starts() -> None:
    assert text_offsets([1, 2, 3], {1: "ab", 2: "", 3: "é"}, start=4) == [4, 6, 6, 7]
    assert text_offsets([7], None) == [0, len("token_id:7")]


# --- renderers: one request's body and chunks ----------------------------------------------

TEXTS = {1: "a", 2: "bc", 3: "d", 4: "e"}
TOPS = [{1: -0.1, 3: -2.0}, {2: -0.3, 4: -1.5}, {3: -0.2, 1: -0.9}]


def completion() -> Completion:
    ids = [1, 2, 3]
    return Completion(
        index=0,
        prompt_index=0,
        text="abcd",
        token_ids=ids,
        finish_reason="length",
        stop_reason=None,
        prompt_tokens=5,
        completion_tokens=3,
        steps=[step(i, logprob=TOPS[k][i]) for k, i in enumerate(ids)],
        top_logprobs=[dict(t) for t in TOPS],
    )


def token_events(choice: Completion) -> list[TokenEvent]:
    return [
        TokenEvent(choice.index, token_id, TEXTS[token_id], s, top)
        for token_id, s, top in zip(
            choice.token_ids, choice.steps, choice.top_logprobs or [], strict=True
        )
    ]


@pytest.mark.parametrize("as_ids", [False, True])
def test_completion_stream_chunks_and_body_give_the_same_logprobs(as_ids: bool) -> None:
    choice = completion()
    opts = options(logprobs=1, token_ids_as_strings=as_ids)
    body = CompletionRenderer(opts).body([choice], TEXTS).choices[0].logprobs
    assert body is not None
    # offsets count the token texts, even when the tokens are written `token_id:N`
    assert body.text_offset == [0, 1, 3]
    assert body.tokens == (
        ["token_id:1", "token_id:2", "token_id:3"] if as_ids else ["a", "bc", "d"]
    )

    renderer = CompletionRenderer(opts)
    streamed = []
    for event in token_events(choice):
        ids = renderer.text_ids(event)
        assert ids is not None
        chunk = renderer.token_chunk(event, {i: TEXTS[i] for i in ids})
        streamed.append(chunk.choices[0].logprobs)
    assert [lp.text_offset[0] for lp in streamed if lp] == body.text_offset
    assert [lp.tokens[0] for lp in streamed if lp] == body.tokens
    assert [lp.top_logprobs[0] for lp in streamed if lp] == body.top_logprobs


def test_the_body_asks_for_the_texts_every_chunk_asks_for() -> None:
    choice = completion()
    for family in (CompletionRenderer, ChatRenderer):
        renderer = family(options(logprobs=1))
        per_token = {i for e in token_events(choice) for i in renderer.text_ids(e) or []}
        assert renderer.completions_text_ids([choice]) == sorted(per_token)
        assert family(options()).completions_text_ids([choice]) is None
        assert family(options()).text_ids(token_events(choice)[0]) is None


def test_chat_sends_the_role_only_in_the_first_chunk_of_each_choice() -> None:
    renderer = ChatRenderer(options(n=2, include_usage=True))
    first, second = completion(), completion()
    second.index = 1
    events = [
        e for pair in zip(token_events(first), token_events(second), strict=True) for e in pair
    ]
    chunks = [json.loads(renderer.token_chunk(e, None).model_dump_json()) for e in events]
    finish = FinishEvent(1, "!", "stop", "x", prompt_tokens=5, completion_tokens=3)
    chunks.append(json.loads(renderer.finish_chunk(finish).model_dump_json()))
    roles = [(c["choices"][0]["index"], c["choices"][0]["delta"].get("role")) for c in chunks]
    assert roles == [(0, "assistant"), (1, "assistant")] + [(0, None), (1, None)] * 2 + [(1, None)]
    assert {c["id"] for c in chunks} == {renderer.request_id}
    assert renderer.request_id.startswith("chatcmpl-")
    last = json.loads(renderer.usage_chunk().model_dump_json())
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_stream_diagnostics_per_token_then_the_summary_on_finish() -> None:
    renderer = CompletionRenderer(options(diagnostics=True, return_token_ids=True))
    choice = completion()
    tokens = [renderer.token_chunk(e, None).choices[0] for e in token_events(choice)]
    assert [c.token_ids for c in tokens] == [[1], [2], [3]]
    assert all(c.diagnostics and c.diagnostics.summary is None for c in tokens)
    done = renderer.finish_chunk(FinishEvent(0, "", "length", None, 5, 3)).choices[0]
    assert done.token_ids is None
    assert done.diagnostics is not None
    assert done.diagnostics.token_ids == []
    assert done.diagnostics.summary is not None
    assert done.diagnostics.summary.tokens == 3
    assert renderer.request_id.startswith("cmpl-")
