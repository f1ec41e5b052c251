"""What one generation is asked and what it gives back: the engine's plain data.

Prompts as token ids (`DualPrompt`), chat messages, the request's parameters
(`GenerationParams`), the events a running request emits (`TokenEvent`, `FinishEvent`) and the
folded result of one choice (`Completion`). No I/O and no HTTP types: the HTTP layer, the batch
job and library users all speak these.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from app.diagnostics import summary
from app.sampling.types import MixConfig, StepResult

FinishReason = Literal["stop", "length"]

# OpenAI's (and the API's) bound on the client's `logprobs`: top-N of q, N <= 20.
MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class DualPrompt:
    """One prompt as token ids, as each model sees it (ids, never text: no re-tokenization)."""

    teacher: list[int]
    base: list[int]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None  # OpenAI's participant name; the teacher's template may show it


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """Options of the teacher's chat template rendering (vLLM's TokenizeChatRequest fields).
    The base's plain rendering (Settings.base_*_format) ignores them."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # vLLM's chat_template_kwargs


Drafter = Literal["auto", "base", "teacher"]
MAX_DRAFT_TOKENS = 16  # the largest k of a speculative round


@dataclass(frozen=True, slots=True)
class Speculative:
    """Speculative rounds (docs/ALGORITHM.md §8): `k` drafted tokens per round (None: adapted
    to the observed acceptance) and who drafts ("auto": the model closer to q)."""

    k: int | None = None
    drafter: Drafter = "auto"


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Everything about how to generate, independent of the wire format."""

    max_tokens: int | None = 16  # None: up to the context length
    max_tokens_param: str = "max_tokens"  # the field errors about max_tokens name
    n: int = 1
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop ids are held back until this many tokens (vLLM's)
    skip_special_tokens: bool = True  # special ids add no text (vLLM's default)
    logprobs: int | None = None  # top-N of q per token (N <= 20), None = off
    top_k_upstream: int | None = None  # K asked of each upstream; None = settings.top_k
    mixing: MixConfig = field(default_factory=MixConfig)
    speculative: Speculative | None = None  # None: token by token
    # docs/ALGORITHM.md §9: a step whose uncertain_mass exceeds this fetches more (None: off).
    max_uncertain_mass: float | None = None
    # Per-token diagnostics are read: compute uncertain_mass for every token (~0.05–4 ms a
    # token, so not by default) and the models' logprobs of the token.
    diagnostics: bool = False


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token of one choice. `text` is the text released with it: possibly ""
    (an incomplete UTF-8 character, or text held back while it may start a stop string)."""

    index: int  # choice index = prompt_index * n + sample_index (OpenAI order)
    token_id: int
    text: str
    step: StepResult
    top_logprobs: dict[int, float] | None  # top-N of log q when params.logprobs is set


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """The end of one choice; `text` flushes anything still held back."""

    index: int
    text: str
    finish_reason: FinishReason
    stop_reason: int | str | None  # stop token id, stop string, or None (EOS / length)
    prompt_tokens: int  # the teacher prompt's length
    completion_tokens: int


Event = TokenEvent | FinishEvent


@dataclass(slots=True)
class Completion:
    """The final result of one choice (the library's and the batch job's view).

    `token_text` is set when asked for (`Coordinator.generate(..., token_text=True)`): the text
    each token released, the finish flush added to the last one, so `"".join(token_text) ==
    text`; a token that ends mid-character or inside a possible stop string released ""."""

    index: int
    prompt_index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stop_reason: int | str | None
    prompt_tokens: int
    completion_tokens: int
    steps: list[StepResult]
    top_logprobs: list[dict[int, float]] | None
    token_text: list[str] | None = None

    @property
    def summary(self) -> dict[str, float | int | None]:
        """`app.diagnostics.summary(self.steps)`: alpha_mean, fallback_rate, tokens."""
        return summary(self.steps)


class Observer(Protocol):
    """Hooks for metrics (app.metrics implements it); the engine never imports metrics."""

    def upstream_call(self, upstream: str, seconds: float, error: str | None) -> None: ...

    def step(self, result: StepResult, seconds: float) -> None: ...


async def fold(
    events: AsyncIterable[Event],
    prompts: Sequence[DualPrompt],
    params: GenerationParams,
    *,
    token_text: bool = False,
) -> list[Completion]:
    """One `Completion` per choice from a request's events, in index order."""
    n = params.n
    completions = [
        Completion(
            index=i,
            prompt_index=i // n,
            text="",
            token_ids=[],
            finish_reason="length",
            stop_reason=None,
            prompt_tokens=len(prompts[i // n].teacher),
            completion_tokens=0,
            steps=[],
            top_logprobs=[] if params.logprobs is not None else None,
            token_text=[] if token_text else None,
        )
        for i in range(len(prompts) * n)
    ]
    texts: list[list[str]] = [[] for _ in completions]
    async for event in events:
        c = completions[event.index]
        texts[event.index].append(event.text)
        if isinstance(event, TokenEvent):
            c.token_ids.append(event.token_id)
            c.steps.append(event.step)
            if c.top_logprobs is not None and event.top_logprobs is not None:
                c.top_logprobs.append(event.top_logprobs)
            if c.token_text is not None:
                c.token_text.append(event.text)
            continue
        if c.token_text is not None and event.text:
            if c.token_text:
                c.token_text[-1] += event.text
            else:
                c.token_text.append(event.text)
        c.finish_reason = event.finish_reason
        c.stop_reason = event.stop_reason
        c.completion_tokens = event.completion_tokens
    for c, parts in zip(completions, texts, strict=True):
        c.text = "".join(parts)
    return completions
