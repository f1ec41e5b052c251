"""`/v1/completions` responses: the body and the stream's chunks, with OpenAI completions'
`logprobs` (tokens, token_logprobs, top_logprobs keyed by token string, text_offset).

Stream: one chunk per generated token (its text delta, which may be "" while text is held
back, its logprobs and diagnostics), then one chunk per choice with the finish reason and the
flushed text (README.md "Logprobs" and "diagnostics").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.generation import Completion, FinishEvent, TokenEvent
from app.protocol.responses import (
    CompletionLogProbs,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from app.render.common import (
    Renderer,
    Texts,
    clamp_logprob,
    ranked_logprobs,
    token_string,
    tops,
)


def text_offsets(token_ids: Sequence[int], texts: Texts | None, start: int = 0) -> list[int]:
    """vLLM's `text_offset` of each token (`start` plus the lengths of the token strings
    before it), then the offset after the last token (where the next one starts)."""
    offsets = [start]
    for token_id in token_ids:
        offsets.append(offsets[-1] + len(token_string(token_id, texts)))
    return offsets


def completion_top_logprobs(
    ranked: Sequence[tuple[int, float]], texts: Texts | None, n: int
) -> dict[str, float]:
    """One position of OpenAI completions' `top_logprobs`: keyed by token string, at most n+1
    entries. Two ids with the same text would collide as keys (vLLM issue #44319): the second
    one is keyed `token_id:N` instead, so no entry is lost."""
    out: dict[str, float] = {}
    for token_id, value in ranked[: n + 1]:
        key = token_string(token_id, texts)
        if key in out:
            key = f"token_id:{token_id}"
        out[key] = clamp_logprob(value)
    return out


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    tops: Sequence[Mapping[int, float] | None],
    offsets: Sequence[int],
    texts: Texts | None,
    n: int,
) -> CompletionLogProbs:
    result = CompletionLogProbs()
    for token_id, value, top, offset in zip(token_ids, logprobs, tops, offsets, strict=True):
        ranked = ranked_logprobs(token_id, value, top)
        result.tokens.append(token_string(token_id, texts))
        result.token_logprobs.append(clamp_logprob(value))
        result.top_logprobs.append(completion_top_logprobs(ranked, texts, n))
        result.text_offset.append(offset)
    return result


class CompletionRenderer(Renderer):
    id_prefix = "cmpl"

    def _logprobs(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        top: Sequence[Mapping[int, float] | None],
        texts: Texts | None,
        start: int,
    ) -> tuple[CompletionLogProbs | None, int]:
        """The tokens' `logprobs` (None when not asked) and the text_offset after them.
        Offsets count the token texts even when the tokens are written `token_id:N`."""
        n = self.options.logprobs
        if n is None:
            return None, start
        offsets = text_offsets(token_ids, texts, start)
        result = completion_logprobs(token_ids, logprobs, top, offsets[:-1], self.names(texts), n)
        return result, offsets[-1]

    def _echo(self, index: int) -> str:
        """`echo`: the prompt's text, written before the choice's text (vLLM's)."""
        echo = self.options.echo
        return echo[index // self.options.n] if echo else ""

    def body(self, completions: Sequence[Completion], texts: Texts | None) -> CompletionResponse:
        choices = []
        for c in completions:
            logprobs, _ = self._logprobs(
                c.token_ids, [s.logprob for s in c.steps], tops(c), texts, 0
            )
            choices.append(
                CompletionResponseChoice(
                    index=c.index,
                    text=self._echo(c.index) + c.text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    **self.completion_extras(c),
                )
            )
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.options.model,
            choices=choices,
            usage=self.body_usage(completions),
        )

    def token_chunk(self, event: TokenEvent, texts: Texts | None) -> CompletionStreamResponse:
        state = self.choice(event.index)
        logprobs, state.offset = self._logprobs(
            [event.token_id], [event.step.logprob], [event.top_logprobs], texts, state.offset
        )
        extra = self.token_extras(event)
        text = event.text
        if not state.echoed:
            state.echoed = True
            text = self._echo(event.index) + text
        return self._chunk(event.index, text, logprobs, None, extra)

    def finish_chunk(self, event: FinishEvent) -> CompletionStreamResponse:
        extra = self.finish_extras(event)
        return self._chunk(event.index, event.text, None, event.finish_reason, extra)

    def usage_chunk(self) -> CompletionStreamResponse:
        return self._stream_response([], self.stream_usage())

    def _chunk(
        self,
        index: int,
        text: str,
        logprobs: CompletionLogProbs | None,
        finish_reason: str | None,
        extra: dict[str, Any],
    ) -> CompletionStreamResponse:
        choice = CompletionResponseChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish_reason, **extra
        )
        return self._stream_response([choice], None)

    def _stream_response(
        self, choices: list[CompletionResponseChoice], usage: UsageInfo | None
    ) -> CompletionStreamResponse:
        return CompletionStreamResponse(
            id=self.request_id,
            created=self.created,
            model=self.options.model,
            choices=choices,
            usage=usage,
        )
