"""`/v1/chat/completions` responses: the body and the stream's chunks, with OpenAI chat's
`logprobs` (`content[i]`: token, logprob, bytes and the top N).

Stream: as completions (app/render/completions.py), with the text in `delta.content`; the
assistant role goes out in the first chunk of each choice only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.generation import Completion, FinishEvent, TokenEvent
from app.protocol.responses import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
    UsageInfo,
)
from app.render.common import Renderer, Texts, clamp_logprob, token_string, tops


def _chat_logprob(token_id: int, value: float, texts: Texts | None) -> dict[str, Any]:
    token = token_string(token_id, texts)
    return {"token": token, "logprob": clamp_logprob(value), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    tops: Sequence[Mapping[int, float] | None],
    texts: Texts | None,
    n: int,
) -> ChatCompletionLogProbs:
    content = []
    for token_id, value, top in zip(token_ids, logprobs, tops, strict=True):
        best = sorted((top or {}).items(), key=lambda item: -item[1])[:n]
        content.append(
            ChatCompletionLogProbsContent(
                **_chat_logprob(token_id, value, texts),
                top_logprobs=[ChatCompletionLogProb(**_chat_logprob(i, v, texts)) for i, v in best],
            )
        )
    return ChatCompletionLogProbs(content=content)


class ChatRenderer(Renderer):
    id_prefix = "chatcmpl"

    def _logprobs(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        top: Sequence[Mapping[int, float] | None],
        texts: Texts | None,
    ) -> ChatCompletionLogProbs | None:
        n = self.options.logprobs
        if n is None:
            return None
        return chat_logprobs(token_ids, logprobs, top, self.names(texts), n)

    def body(
        self, completions: Sequence[Completion], texts: Texts | None
    ) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.options.model,
            choices=[
                ChatCompletionResponseChoice(
                    index=c.index,
                    message=ChatMessage(content=c.text),
                    logprobs=self._logprobs(
                        c.token_ids, [s.logprob for s in c.steps], tops(c), texts
                    ),
                    finish_reason=c.finish_reason,
                    **self.completion_extras(c),
                )
                for c in completions
            ],
            usage=self.body_usage(completions),
        )

    def token_chunk(self, event: TokenEvent, texts: Texts | None) -> ChatCompletionStreamResponse:
        logprobs = self._logprobs(
            [event.token_id], [event.step.logprob], [event.top_logprobs], texts
        )
        extra = self.token_extras(event)
        return self._chunk(event.index, event.text, logprobs, None, extra)

    def finish_chunk(self, event: FinishEvent) -> ChatCompletionStreamResponse:
        extra = self.finish_extras(event)
        return self._chunk(event.index, event.text, None, event.finish_reason, extra)

    def usage_chunk(self) -> ChatCompletionStreamResponse:
        return self._stream_response([], self.stream_usage())

    def _delta(self, index: int, text: str) -> DeltaMessage:
        """The assistant role in the first chunk of each choice only."""
        state = self.choice(index)
        if state.role_sent:
            return DeltaMessage(content=text)
        state.role_sent = True
        return DeltaMessage(role="assistant", content=text)

    def _chunk(
        self,
        index: int,
        text: str,
        logprobs: ChatCompletionLogProbs | None,
        finish_reason: str | None,
        extra: dict[str, Any],
    ) -> ChatCompletionStreamResponse:
        choice = ChatCompletionResponseStreamChoice(
            index=index,
            delta=self._delta(index, text),
            logprobs=logprobs,
            finish_reason=finish_reason,
            **extra,
        )
        return self._stream_response([choice], None)

    def _stream_response(
        self, choices: list[ChatCompletionResponseStreamChoice], usage: UsageInfo | None
    ) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=self.request_id,
            created=self.created,
            model=self.options.model,
            choices=choices,
            usage=usage,
        )
