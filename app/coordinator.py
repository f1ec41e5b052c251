"""The generation loop: per-step fan-out to both upstreams, the math, stop rules, events.

INTERFACE STUB (written first so the HTTP layer, metrics and the batch job can be built in
parallel). The public names below are the contract; the implementation fills in the bodies.
No HTTP-server or SSE code lives here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from app.sampling.types import MixConfig, StepResult
from app.settings import Settings

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class DualPrompt:
    """One prompt as token ids, as each model sees it (ids, never text: no re-tokenization)."""

    teacher: list[int]
    base: list[int]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Everything about how to generate, independent of the wire format."""

    max_tokens: int | None = 16  # None: up to the context length
    n: int = 1
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N of q per token (N <= 20), None = off
    top_k_upstream: int | None = None  # K asked of each upstream; None = settings.top_k
    mixing: MixConfig = field(default_factory=MixConfig)


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
    """The final result of one choice (the library's and the batch job's view)."""

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


class Observer(Protocol):
    """Hooks for metrics (app.metrics implements it); the coordinator never imports metrics."""

    def upstream_call(self, upstream: str, seconds: float, error: str | None) -> None: ...

    def step(self, result: StepResult, seconds: float) -> None: ...


class Coordinator:
    """Owns both upstream clients; `async with Coordinator(settings) as coord: ...`."""

    def __init__(self, settings: Settings, *, observer: Observer | None = None) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Coordinator:
        raise NotImplementedError

    async def __aexit__(self, *exc_info: object) -> None:
        raise NotImplementedError

    async def ready(self) -> bool:
        """Both upstreams answer (for GET /ready)."""
        raise NotImplementedError

    async def completion_prompts(
        self,
        prompt: str | list[int] | list[str] | list[list[int]],
        base_prompt: str | list[int] | list[str] | list[list[int]] | None = None,
    ) -> list[DualPrompt]:
        """Tokenize text prompts on each upstream (ids pass through)."""
        raise NotImplementedError

    async def chat_prompt(
        self,
        messages: Sequence[ChatMessage],
        base_messages: Sequence[ChatMessage] | None = None,
        base_prompt: str | list[int] | None = None,
    ) -> DualPrompt:
        """Teacher: its own chat template (upstream /tokenize with messages). Base:
        base_prompt, else base_messages or messages rendered with the plain template."""
        raise NotImplementedError

    def stream(
        self, prompts: Sequence[DualPrompt], params: GenerationParams
    ) -> AsyncIterator[Event]:
        """Events of every choice, interleaved as they happen. Cancelling the consumer
        cancels every upstream call of this request."""
        raise NotImplementedError

    async def generate(
        self, prompts: Sequence[DualPrompt], params: GenerationParams
    ) -> list[Completion]:
        """All choices, in index order."""
        raise NotImplementedError
