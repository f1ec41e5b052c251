"""The response wire models: OpenAI's shapes (bodies and stream chunks), plus vLLM's
`stop_reason` / `token_ids` (docs/VLLM_API.md) and our `diagnostics` (README.md). app/render/
fills them from the engine's results; field order here is the JSON key order on the wire.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

# Our and vLLM's additions to OpenAI's response shapes are left out when unused, so plain
# OpenAI responses look exactly like OpenAI's.
_OMITTED = Field(None, exclude_if=lambda value: value is None)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class DiagnosticsSummary(BaseModel):
    alpha_mean: float | None
    # Share of tokens whose step fell back to the teacher (α = 1) because the stability
    # check found the two models too far apart (reason "unstable", docs/ALGORITHM.md §5 rule 3).
    fallback_rate: float | None
    tokens: int
    # Speculative rounds (docs/ALGORITHM.md §8; definitions in app/diagnostics.py).
    acceptance_rate: float | None = None
    tokens_per_round: float | None = None
    requests_per_token: float | None = None


class Diagnostics(BaseModel):
    """README.md's `diagnostics`: per-token values of docs/ALGORITHM.md §6 (JSON null for
    non-finite numbers)."""

    token_ids: list[int]
    alpha: list[float | None]
    reason: list[str]
    js: list[float | None]
    overlap_mass: list[float | None]
    overlap_count: list[int]
    kl_gap: list[float | None]
    chernoff: list[float | None]
    filled_mass: list[float | None]
    # How a speculative round made each token: null (token by token), "accepted", "resampled"
    # or "bonus" (docs/ALGORITHM.md §8).
    draft: list[str | None]
    # docs/ALGORITHM.md §9: an upper bound on TV(q, the full-vocabulary q*) per token; each
    # model's raw logprob of the token, exact when `*_exact` (the model returned the id), else
    # an upper bound.
    uncertain_mass: list[float | None]
    base_logprob: list[float | None]
    teacher_logprob: list[float | None]
    base_logprob_exact: list[bool | None]
    teacher_logprob_exact: list[bool | None]
    # With mixing.max_uncertain_mass: whether the token's uncertain_mass ended within it (false:
    # the upstreams' --max-logprobs could not get there), and how many fetches of more values
    # its step made; null / 0 without a tolerance.
    certified: list[bool | None]
    refetches: list[int]
    summary: DiagnosticsSummary | None = _OMITTED


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _OMITTED
    diagnostics: Diagnostics | None = _OMITTED


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = _OMITTED


class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = _OMITTED
    content: str | None = None


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _OMITTED
    diagnostics: Diagnostics | None = _OMITTED


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo | None = None


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _OMITTED
    diagnostics: Diagnostics | None = _OMITTED


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = _OMITTED


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dual-vllm"
    # vLLM's card fields: `root` is the served model's name, `max_model_len` the context the
    # gateway can serve (the smaller of the two upstreams').
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
