"""What both response families share: token strings, the ids whose text a response shows,
usage, the `diagnostics` wire object, and the `Renderer` base that holds one request's options,
id and `created`, plus the per-choice state a stream needs.

Pure: no I/O. A renderer says which token ids it needs the text of (`text_ids`); the caller
looks them up (the backend's `token_texts`) and passes the texts back in.
"""

from __future__ import annotations

import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel

from app.diagnostics import API_COLUMNS, token_columns
from app.diagnostics import summary as diagnostics_summary
from app.generation import Completion, FinishEvent, GenerationParams, TokenEvent
from app.protocol import ChatCompletionRequest, CompletionRequest
from app.protocol.responses import Diagnostics, DiagnosticsSummary, UsageInfo
from app.sampling.types import StepResult
from app.settings import Settings

# vLLM's clamp for -inf logprobs in JSON (docs/VLLM_API.md): JSON has no infinity.
LOGPROB_FLOOR = -9999.0

Texts = Mapping[int, str]


def finite(value: float | None) -> float | None:
    """JSON null for NaN and infinities (diagnostics)."""
    return value if value is not None and math.isfinite(value) else None


def clamp_logprob(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def token_string(token_id: int, texts: Texts | None) -> str:
    """The string OpenAI clients expect for a token: its text, or vLLM's `token_id:N` when
    the client asked `return_tokens_as_token_ids` (texts is None) or the text is unknown."""
    if texts is None or token_id not in texts:
        return f"token_id:{token_id}"
    return texts[token_id]


def ranked_logprobs(
    token_id: int, logprob: float, top: Mapping[int, float] | None
) -> list[tuple[int, float]]:
    """vLLM's order: the sampled token first, then the top-N of q (without repeating it)."""
    ranked = [(token_id, logprob)]
    for other, value in sorted((top or {}).items(), key=lambda item: -item[1]):
        if other != token_id:
            ranked.append((other, value))
    return ranked


def ranked_ids(token_id: int, logprob: float, top: Mapping[int, float] | None, n: int) -> list[int]:
    """The ids whose text one position of `logprobs` shows: the sampled token and the top n
    (completions list exactly these; chat's top n is a subset of them)."""
    return [listed for listed, _ in ranked_logprobs(token_id, logprob, top)[: n + 1]]


def tops(completion: Completion) -> list[dict[int, float] | None]:
    """One top-N dict (or None) per token id, whatever the engine recorded."""
    recorded: list[dict[int, float] | None] = list(completion.top_logprobs or [])
    count = len(completion.token_ids)
    return (recorded + [None] * count)[:count]


def usage(prompt_tokens: Mapping[int, int], completion_tokens: int) -> UsageInfo:
    """`prompt_tokens` per prompt index (counted once per prompt, not per choice, like vLLM)."""
    total_prompt = sum(prompt_tokens.values())
    return UsageInfo(
        prompt_tokens=total_prompt,
        completion_tokens=completion_tokens,
        total_tokens=total_prompt + completion_tokens,
    )


def summarize(steps: Sequence[StepResult]) -> DiagnosticsSummary:
    """app/diagnostics.py's summary (the batch job writes the same numbers)."""
    return DiagnosticsSummary.model_validate(diagnostics_summary(steps))


def diagnostics(steps: Sequence[StepResult], *, summary: bool) -> Diagnostics:
    """The `diagnostics` object: app/diagnostics.py's per-token columns (non-finite -> null),
    with the summary when asked."""
    columns = token_columns(steps)
    return Diagnostics(
        **{
            name: [v if isinstance(v, str) else finite(v) for v in columns[name]]
            for name in API_COLUMNS
        },
        summary=summarize(steps) if summary else None,
    )


def summary_only(steps: Sequence[StepResult]) -> Diagnostics:
    """A stream's finish chunk: empty per-token lists and the choice's summary."""
    result = diagnostics([], summary=False)
    result.summary = summarize(steps)
    return result


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """What of one request shapes its response (besides the engine's results)."""

    model: str
    n: int
    logprobs: int | None  # top-N of q, None = off
    token_ids_as_strings: bool  # return_tokens_as_token_ids: "token_id:N" instead of text
    diagnostics: bool
    include_usage: bool
    return_token_ids: bool
    echo: tuple[str, ...] = ()  # completions' `echo`: each prompt's text, by prompt index

    @classmethod
    def of(
        cls,
        body: CompletionRequest | ChatCompletionRequest,
        settings: Settings,
        params: GenerationParams,
    ) -> RenderOptions:
        return cls(
            model=settings.model_name,
            n=params.n,
            logprobs=params.logprobs,
            token_ids_as_strings=bool(body.return_tokens_as_token_ids),
            diagnostics=body.diagnostics(settings),
            include_usage=body.include_usage,
            return_token_ids=bool(body.return_token_ids),
            echo=body.echo_texts() if isinstance(body, CompletionRequest) else (),
        )


@dataclass(slots=True)
class ChoiceState:
    """A streamed choice so far."""

    steps: list[StepResult] = field(default_factory=list)  # kept only with diagnostics
    offset: int = 0  # completions: text_offset of the next token
    role_sent: bool = False  # chat: the assistant role went out in a chunk
    echoed: bool = False  # completions: the prompt text (echo) went out in a chunk


class Renderer(ABC):
    """One request's response, body or chunks; a subclass per shape family (completions,
    chat), picked once by the route. Built when the response is: its `created` and id are
    the response's."""

    id_prefix: ClassVar[str]

    def __init__(self, options: RenderOptions) -> None:
        self.options = options
        self.request_id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices: dict[int, ChoiceState] = {}
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens = 0

    @property
    def include_usage(self) -> bool:
        return self.options.include_usage

    # --- token texts -------------------------------------------------------------------------

    def text_ids(self, event: TokenEvent) -> list[int] | None:
        """The ids whose text this token's chunk shows (None: no logprobs, no texts)."""
        if self.options.logprobs is None:
            return None
        return ranked_ids(
            event.token_id, event.step.logprob, event.top_logprobs, self.options.logprobs
        )

    def completions_text_ids(self, completions: Iterable[Completion]) -> list[int] | None:
        """The ids whose text the body shows, sorted, each once (None: no logprobs)."""
        n = self.options.logprobs
        if n is None:
            return None
        ids = {
            listed
            for c in completions
            for token_id, step, top in zip(c.token_ids, c.steps, tops(c), strict=True)
            for listed in ranked_ids(token_id, step.logprob, top, n)
        }
        return sorted(ids)

    def names(self, texts: Texts | None) -> Texts | None:
        """The texts token strings are written with: none with return_tokens_as_token_ids."""
        return None if self.options.token_ids_as_strings else texts

    # --- extras of a choice ------------------------------------------------------------------

    def completion_extras(self, completion: Completion) -> dict[str, Any]:
        extra: dict[str, Any] = {"stop_reason": completion.stop_reason}
        if self.options.return_token_ids:
            extra["token_ids"] = completion.token_ids
        if self.options.diagnostics:
            extra["diagnostics"] = diagnostics(completion.steps, summary=True)
        return extra

    def token_extras(self, event: TokenEvent) -> dict[str, Any]:
        """A token's chunk: its id and diagnostics (remembering its step for the summary)."""
        extra: dict[str, Any] = {}
        if self.options.return_token_ids:
            extra["token_ids"] = [event.token_id]
        if self.options.diagnostics:
            self.choice(event.index).steps.append(event.step)
            extra["diagnostics"] = diagnostics([event.step], summary=False)
        return extra

    def finish_extras(self, event: FinishEvent) -> dict[str, Any]:
        """A finish chunk: the stop reason and the choice's summary; counts the usage."""
        self.prompt_tokens[event.index // self.options.n] = event.prompt_tokens
        self.completion_tokens += event.completion_tokens
        extra: dict[str, Any] = {"stop_reason": event.stop_reason}
        if self.options.diagnostics:
            extra["diagnostics"] = summary_only(self.choice(event.index).steps)
        return extra

    def choice(self, index: int) -> ChoiceState:
        return self.choices.setdefault(index, ChoiceState())

    def body_usage(self, completions: Sequence[Completion]) -> UsageInfo:
        prompt_tokens = {c.prompt_index: c.prompt_tokens for c in completions}
        return usage(prompt_tokens, sum(c.completion_tokens for c in completions))

    def stream_usage(self) -> UsageInfo:
        return usage(self.prompt_tokens, self.completion_tokens)

    # --- the family's shapes -----------------------------------------------------------------

    @abstractmethod
    def body(self, completions: Sequence[Completion], texts: Texts | None) -> BaseModel:
        """The non-streaming response; `texts` for the ids of `completions_text_ids`."""

    @abstractmethod
    def token_chunk(self, event: TokenEvent, texts: Texts | None) -> BaseModel:
        """One token's chunk; `texts` for the ids of `text_ids(event)`."""

    @abstractmethod
    def finish_chunk(self, event: FinishEvent) -> BaseModel:
        """A choice's last chunk: its finish reason and the text still held back."""

    @abstractmethod
    def usage_chunk(self) -> BaseModel:
        """The last chunk with `stream_options.include_usage`: no choices, the usage."""
