"""OpenAI wire models (named as OpenAI / vLLM name them) and our extensions beside them.

Requests: `CompletionRequest`, `ChatCompletionRequest` with the extensions of ../shared/API.md
(`base_prompt`, `base_messages`, `mixing`). Pydantic checks types and ranges; `check(settings)`
checks what needs the settings or several fields at once (prompts x n <= max_n, `base_prompt`'s
length, OpenAI fields this gateway does not implement). Every failure names the parameter, so
the HTTP layer can answer 400 with OpenAI's `param`.

Responses: the OpenAI shapes, plus vLLM's `stop_reason` / `token_ids` and our `diagnostics`.
The builders at the bottom turn coordinator results (`StepResult`, token ids, log q) into them;
they never do I/O (token texts for `logprobs` are looked up by the caller and passed in).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from app import coordinator as coord
from app import generation
from app.diagnostics import summary as diagnostics_summary
from app.errors import InvalidRequestError
from app.options import MIX_OPTIONS, Preset, resolve_mixing
from app.sampling.types import MixConfig, StepResult
from app.settings import Settings

# API.md: logprobs is "top-N of q, N <= 20" (OpenAI's own cap on chat top_logprobs is 20);
# the coordinator enforces the same bound for library callers.
MAX_LOGPROBS = generation.MAX_LOGPROBS
# OpenAI and vLLM >= 0.33 (VLLM_MAX_STOP_STRINGS): at most 4 stop strings.
MAX_STOP_STRINGS = 4
# vLLM's -inf clamp for logprobs in JSON (reference §2.2): JSON has no infinity.
LOGPROB_FLOOR = -9999.0

TokenId = Annotated[StrictInt, Field(ge=0)]
# `prompt` / `base_prompt` of /v1/completions: text, ids, or a batch of either.
PromptInput = str | list[TokenId] | list[str] | list[list[TokenId]]


class OpenAIBaseModel(BaseModel):
    # Unknown fields are rejected (OpenAI itself answers "Unrecognized request argument");
    # vLLM only logs them, which lets a typo like `mixng` silently run on the defaults.
    model_config = ConfigDict(extra="forbid")


# --- mixing (API.md "Requests") ------------------------------------------------------------


class MixingOptions(OpenAIBaseModel):
    """`mixing`: per-request overrides of the server's defaults (ALGORITHM.md for meanings).

    A field that is absent keeps the preset's / server's value; an explicit `null` means
    "automatic" for `alpha` and "off" for `trust_region_top_p`.
    """

    preset: Preset | None = None
    alpha: float | None = Field(None, ge=0.0, le=1.0)
    force_first_token: StrictBool | None = None
    trust_region_top_p: float | None = Field(None, gt=0.0, le=1.0)
    stability_check: StrictBool | None = None
    js_threshold: float | None = Field(None, ge=0.0)
    overlap_threshold: float | None = Field(None, ge=0.0, le=1.0)
    auto_fallback: StrictBool | None = None
    top_k: int | None = Field(None, ge=1, le=1024, description="K asked of each upstream")
    # Speculative rounds (ALGORITHM.md §8) are not built yet; the field exists so clients
    # can send null, and anything else gets a message saying so (not pydantic's "should be None").
    speculative: Any = Field(None, description="speculative rounds: not available yet")
    diagnostics: StrictBool | None = None

    @field_validator("speculative")
    @classmethod
    def _speculative_off(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("speculative rounds are not available yet; only null is accepted")
        return None

    def explicit(self) -> dict[str, Any]:
        """The MixConfig fields this request sets explicitly (the preset aside)."""
        values: dict[str, Any] = {}
        for name in MIX_OPTIONS:
            if name in self.model_fields_set:
                value = getattr(self, name)
                if value is None and name not in ("alpha", "trust_region_top_p"):
                    continue  # null = "the default" for the boolean / threshold options
                values[name] = value
        return values


class StreamOptions(OpenAIBaseModel):
    include_usage: StrictBool | None = False
    # vLLM's per-chunk usage; not offered (OpenAI does not have it).
    continuous_usage_stats: Literal[False] | None = False
    # OpenAI's random padding against length side channels; accepted, nothing to obfuscate.
    include_obfuscation: StrictBool | None = None


# --- shared sampling fields ----------------------------------------------------------------


class _SamplingRequest(OpenAIBaseModel):
    model: str | None = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: StrictBool = False
    ignore_eos: StrictBool = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's convention: 0 or -1 = off
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_tokens_as_token_ids: StrictBool | None = None
    return_token_ids: StrictBool | None = None
    mixing: MixingOptions | None = None
    # OpenAI fields accepted only at their neutral value (check() rejects anything else).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    min_p: float | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
            if any(not s for s in value):
                raise ValueError("stop strings must not be empty")
        elif value == "":
            raise ValueError("a stop string must not be empty")
        return value

    def _check_common(self, settings: Settings, prompts: int) -> None:
        if prompts * self.n > settings.max_n:
            raise InvalidRequestError(
                f"this request asks for {prompts * self.n} choices (prompts x n); "
                f"the limit is {settings.max_n}",
                param="n",
            )
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options can only be set when stream is true", param="stream_options"
            )
        neutral: dict[str, Any] = {
            "frequency_penalty": (0.0,),
            "presence_penalty": (0.0,),
            "repetition_penalty": (1.0,),
            "min_tokens": (0,),
            "min_p": (0.0,),
        }
        for name, allowed in neutral.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise InvalidRequestError(
                    f"`{name}` is not supported by this gateway (only {allowed[0]} is accepted)",
                    param=name,
                )
        if self.logit_bias:
            raise InvalidRequestError(
                "`logit_bias` is not supported by this gateway", param="logit_bias"
            )

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def diagnostics(self, settings: Settings) -> bool:
        if self.mixing is not None and self.mixing.diagnostics is not None:
            return self.mixing.diagnostics
        return settings.diagnostics

    def mix_config(self, settings: Settings) -> MixConfig:
        """The server's defaults, then the preset, then the explicit `mixing` fields, plus the
        request's OpenAI sampling options (ALGORITHM.md §2 and §5)."""
        return resolve_mixing(
            settings.mixing_defaults(),
            self.mixing.preset if self.mixing else None,
            self.mixing.explicit() if self.mixing else {},
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None or self.top_k < 0 else self.top_k,
        )

    def _params(
        self, settings: Settings, max_tokens: int | None, logprobs: int | None
    ) -> coord.GenerationParams:
        seed = None if self.seed is None else self.seed % 2**64  # numpy wants seed >= 0
        return coord.GenerationParams(
            max_tokens=max_tokens,
            n=self.n,
            seed=seed,
            stop=tuple(self.stop_list),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_k_upstream=self.mixing.top_k if self.mixing else None,
            mixing=self.mix_config(settings),
        )


# --- /v1/completions -----------------------------------------------------------------------


def _check_prompt(value: object, name: str) -> object:
    """Shape checks with one readable message (instead of one error per union member)."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be empty")
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"{name} must be a non-empty string, a list of token ids, a list of strings "
            "or a list of lists of token ids"
        )
    if all(isinstance(item, str) for item in value):
        if not all(value):
            raise ValueError(f"{name} must not contain empty strings")
        return value
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        if any(item < 0 for item in value):
            raise ValueError(f"{name}: token ids must be >= 0")
        return value
    if all(isinstance(item, list) for item in value):
        for sub in value:
            if not sub:
                raise ValueError(f"{name} must not contain empty token lists")
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in sub):
                raise ValueError(f"{name}: token ids must be integers >= 0")
        return value
    raise ValueError(
        f"{name} must be a string, a list of token ids, a list of strings "
        "or a list of lists of token ids (not a mix)"
    )


def prompt_count(prompt: PromptInput) -> int:
    """How many prompts: a string or one id list is one; a list of either is a batch."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return 1
    return len(prompt)


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions` (OpenAI's request, vLLM's extras, API.md's extensions)."""

    prompt: PromptInput
    base_prompt: PromptInput | None = None
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", "base_prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: object, info: Any) -> object:
        if value is None and info.field_name == "base_prompt":
            return None
        return _check_prompt(value, info.field_name)

    def check(self, settings: Settings) -> None:
        """Checks that need the settings or several fields; raises InvalidRequestError."""
        count = prompt_count(self.prompt)
        self._check_common(settings, count)
        if self.base_prompt is not None and prompt_count(self.base_prompt) != count:
            raise InvalidRequestError(
                f"base_prompt has {prompt_count(self.base_prompt)} prompt(s) but prompt has "
                f"{count}; a list must match prompt's length",
                param="base_prompt",
            )
        if self.echo:
            raise InvalidRequestError("`echo` is not supported by this gateway", param="echo")
        if self.suffix:
            raise InvalidRequestError("`suffix` is not supported by this gateway", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError(
                "`best_of` is not supported by this gateway (only best_of == n)", param="best_of"
            )

    def generation_params(self, settings: Settings) -> coord.GenerationParams:
        max_tokens = 16 if self.max_tokens is None else self.max_tokens  # vLLM: null -> 16
        return self._params(settings, max_tokens, self.logprobs)


# --- /v1/chat/completions ------------------------------------------------------------------


class ChatCompletionContentPartText(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatCompletionMessageParam(OpenAIBaseModel):
    # "developer" is OpenAI's newer name for "system"; chat templates only know "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ChatCompletionContentPartText]
    name: str | None = None

    def to_message(self) -> coord.ChatMessage:
        content = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )
        role = "system" if self.role == "developer" else self.role
        return coord.ChatMessage(role=role, content=content)


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`. The teacher renders `messages` with its own chat template;
    the base sees `base_prompt`, else `base_messages`, else `messages`, in the plain template."""

    messages: list[ChatCompletionMessageParam] = Field(min_length=1)
    base_messages: list[ChatCompletionMessageParam] | None = Field(None, min_length=1)
    base_prompt: str | list[TokenId] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Accepted only when they ask for nothing (check() rejects the rest).
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("base_prompt", mode="before")
    @classmethod
    def _base_prompt_shape(cls, value: object) -> object:
        if value is None:
            return None
        checked = _check_prompt(value, "base_prompt")
        if isinstance(checked, list) and checked and not isinstance(checked[0], int):
            raise ValueError("base_prompt of a chat request is one string or one list of ids")
        return checked

    def check(self, settings: Settings) -> None:
        self._check_common(settings, 1)
        if self.base_prompt is not None and self.base_messages is not None:
            raise InvalidRequestError(
                "give base_prompt or base_messages, not both", param="base_prompt"
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError(
                "top_logprobs needs logprobs set to true", param="top_logprobs"
            )
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise InvalidRequestError(
                    f"`{name}` (tool calling) is not supported by this gateway", param=name
                )
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise InvalidRequestError(
                    f"`{name}` (tool calling) is not supported by this gateway", param=name
                )
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidRequestError(
                'only response_format {"type": "text"} is supported', param="response_format"
            )

    def generation_params(self, settings: Settings) -> coord.GenerationParams:
        max_tokens = self.max_completion_tokens or self.max_tokens  # None: up to the context
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(settings, max_tokens, logprobs)

    def chat_messages(self) -> list[coord.ChatMessage]:
        return [m.to_message() for m in self.messages]

    def base_chat_messages(self) -> list[coord.ChatMessage] | None:
        return None if self.base_messages is None else [m.to_message() for m in self.base_messages]


# --- responses -----------------------------------------------------------------------------

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
    # check found the two models too far apart (reason "unstable", ALGORITHM.md §5 rule 3).
    fallback_rate: float | None
    tokens: int


class Diagnostics(BaseModel):
    """API.md "Responses": per-token values of ALGORITHM.md §6 (JSON null for non-finite)."""

    token_ids: list[int]
    alpha: list[float | None]
    reason: list[str]
    js: list[float | None]
    overlap_mass: list[float | None]
    overlap_count: list[int]
    kl_gap: list[float | None]
    chernoff: list[float | None]
    filled_mass: list[float | None]
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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- builders (coordinator results -> wire models) -----------------------------------------


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def summarize(steps: Sequence[StepResult]) -> DiagnosticsSummary:
    """The coordinator's summary (the batch job writes the same numbers)."""
    return DiagnosticsSummary.model_validate(diagnostics_summary(steps))


def diagnostics(steps: Sequence[StepResult], *, summary: bool) -> Diagnostics:
    return Diagnostics(
        token_ids=[s.token_id for s in steps],
        alpha=[_finite(s.alpha) for s in steps],
        reason=[s.reason for s in steps],
        js=[_finite(s.js) for s in steps],
        overlap_mass=[_finite(s.overlap_mass) for s in steps],
        overlap_count=[s.overlap_count for s in steps],
        kl_gap=[_finite(s.kl_gap) for s in steps],
        chernoff=[_finite(s.chernoff) for s in steps],
        filled_mass=[_finite(s.filled_mass) for s in steps],
        summary=summarize(steps) if summary else None,
    )


def token_string(token_id: int, texts: Mapping[int, str] | None) -> str:
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


def completion_top_logprobs(
    ranked: Sequence[tuple[int, float]], texts: Mapping[int, str] | None, n: int
) -> dict[str, float]:
    """One position of OpenAI completions' `top_logprobs`: keyed by token string, at most n+1
    entries. Two ids with the same text would collide as keys (vLLM issue #44319): the second
    one is keyed `token_id:N` instead, so no entry is lost."""
    out: dict[str, float] = {}
    for token_id, value in ranked[: n + 1]:
        key = token_string(token_id, texts)
        if key in out:
            key = f"token_id:{token_id}"
        out[key] = _logprob(value)
    return out


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    tops: Sequence[Mapping[int, float] | None],
    offsets: Sequence[int],
    texts: Mapping[int, str] | None,
    n: int,
) -> CompletionLogProbs:
    result = CompletionLogProbs()
    for token_id, value, top, offset in zip(token_ids, logprobs, tops, offsets, strict=True):
        ranked = ranked_logprobs(token_id, value, top)
        result.tokens.append(token_string(token_id, texts))
        result.token_logprobs.append(_logprob(value))
        result.top_logprobs.append(completion_top_logprobs(ranked, texts, n))
        result.text_offset.append(offset)
    return result


def _chat_logprob(token_id: int, value: float, texts: Mapping[int, str] | None) -> Any:
    token = token_string(token_id, texts)
    return {"token": token, "logprob": _logprob(value), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    tops: Sequence[Mapping[int, float] | None],
    texts: Mapping[int, str] | None,
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


def usage(prompt_tokens: Mapping[int, int], completion_tokens: int) -> UsageInfo:
    """`prompt_tokens` per prompt index (counted once per prompt, not per choice, like vLLM)."""
    total_prompt = sum(prompt_tokens.values())
    return UsageInfo(
        prompt_tokens=total_prompt,
        completion_tokens=completion_tokens,
        total_tokens=total_prompt + completion_tokens,
    )
