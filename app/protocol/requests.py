"""The request wire models: `CompletionRequest`, `ChatCompletionRequest` (OpenAI's fields,
vLLM's extras, our extension fields of README.md "Extension fields": `base_prompt`,
`base_messages`, `mixing`) and their mapping to the engine's `GenerationParams`.

Pydantic checks types, ranges and the prompt union's shape (app/prompts.py `prompt_list`, one
function for HTTP and library callers); `check()` checks what needs several fields at once and
the OpenAI fields this gateway does not implement. Every failure names the parameter, so the
HTTP layer can answer 400 with OpenAI's `param`. Checks against the settings (prompts x n <=
max_n, ...) are app/plan.py's, run by the route before any prompt is tokenized.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from app import generation
from app.errors import InvalidRequestError
from app.options import (
    MIX_OPTIONS,
    Preset,
    SpeculativeOptions,
    resolve_mixing,
    resolve_speculative,
)
from app.prompts import prompt_list
from app.sampling.types import MixConfig
from app.settings import Settings

# logprobs is "top-N of q, N <= 20" (OpenAI's own cap on chat top_logprobs is 20); app/plan.py
# enforces the same bound for library callers.
MAX_LOGPROBS = generation.MAX_LOGPROBS
# OpenAI and vLLM >= 0.33 (VLLM_MAX_STOP_STRINGS): at most 4 stop strings.
MAX_STOP_STRINGS = 4
TokenId = Annotated[StrictInt, Field(ge=0)]
# `prompt` / `base_prompt` of /v1/completions: text, ids, or a batch of either.
PromptInput = str | list[TokenId] | list[str] | list[list[TokenId]]


class OpenAIBaseModel(BaseModel):
    # Unknown fields are rejected (OpenAI itself answers "Unrecognized request argument");
    # vLLM only logs them, which lets a typo like `mixng` silently run on the defaults.
    model_config = ConfigDict(extra="forbid")


# --- mixing (README.md "Extension fields") -----------------------------------------------------


class MixingOptions(OpenAIBaseModel):
    """`mixing`: per-request overrides of the server's defaults (docs/ALGORITHM.md for meanings).

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
    # Speculative rounds (docs/ALGORITHM.md §8): null = token by token; absent = the preset's
    # or the server's setting.
    speculative: SpeculativeOptions | None = None
    # docs/ALGORITHM.md §9: fetch more for a step whose uncertain_mass exceeds this; null = off;
    # absent = the server's setting.
    max_uncertain_mass: float | None = Field(None, ge=0.0, le=1.0)
    diagnostics: StrictBool | None = None

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
    n: int = Field(1, ge=1)  # null = 1 (the official client's and vLLM's default)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: StrictBool = False
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    # Only changes how a slow (Python) tokenizer joins special tokens it does not skip; the
    # gateway's decoding is the teacher's fast tokenizer's. Accepted, ignored.
    spaces_between_special_tokens: StrictBool = True
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's convention: 0 or -1 = off
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # Accepted and ignored (README.md "Request fields"): bookkeeping for OpenAI's own platform
    # (stored completions, tiers, caching and abuse keys) that changes nothing a gateway in
    # front of two vLLM servers generates.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    return_tokens_as_token_ids: StrictBool | None = None
    return_token_ids: StrictBool | None = None
    mixing: MixingOptions | None = None
    # vLLM's sampling parameters, applied to the mixture q (docs/ALGORITHM.md §5a); vLLM's
    # ranges (its SamplingParams checks).
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)

    @field_validator("n", mode="before")
    @classmethod
    def _n_null(cls, value: object) -> object:
        return 1 if value is None else value

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

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options can only be set when stream is true", param="stream_options"
            )
        self.logit_bias_items()  # its keys must be token ids

    def logit_bias_items(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (id, bias) pairs, biases clamped to [-100, 100] (vLLM's rule), keys
        that are not token ids refused with vLLM's message."""
        if not self.logit_bias:
            return ()
        items: dict[int, float] = {}
        invalid: list[str] = []
        for key, bias in self.logit_bias.items():
            try:
                token_id = int(key)
            except ValueError:
                invalid.append(key)
                continue
            if token_id < 0 or not math.isfinite(bias):
                invalid.append(key)
                continue
            items[token_id] = min(100.0, max(-100.0, bias))
        if invalid:
            raise InvalidRequestError(
                "logit_bias contains key(s) that cannot be converted to integer token IDs: "
                f"{invalid!r}",
                param="logit_bias",
            )
        return tuple(sorted(items.items()))

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
        request's OpenAI sampling options (docs/ALGORITHM.md §2 and §5)."""
        return resolve_mixing(
            settings.mixing_defaults(),
            self.mixing.preset if self.mixing else None,
            self.mixing.explicit() if self.mixing else {},
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None or self.top_k < 0 else self.top_k,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.logit_bias_items(),
        )

    def _params(
        self,
        settings: Settings,
        max_tokens: int | None,
        logprobs: int | None,
        max_tokens_param: str = "max_tokens",
    ) -> generation.GenerationParams:
        seed = None if self.seed is None else self.seed % 2**64  # numpy wants seed >= 0
        return generation.GenerationParams(
            max_tokens=max_tokens,
            max_tokens_param=max_tokens_param,
            n=self.n,
            seed=seed,
            stop=tuple(self.stop_list),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens or 0,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs,
            top_k_upstream=self.mixing.top_k if self.mixing else None,
            mixing=self.mix_config(settings),
            diagnostics=self.diagnostics(settings),
            max_uncertain_mass=(
                self.mixing.max_uncertain_mass
                if self.mixing is not None and "max_uncertain_mass" in self.mixing.model_fields_set
                else settings.max_uncertain_mass
            ),
            speculative=resolve_speculative(
                settings.speculative_default(),
                self.mixing.preset if self.mixing else None,
                self.mixing.speculative if self.mixing else None,
                self.mixing is not None and "speculative" in self.mixing.model_fields_set,
            ),
        )


# --- /v1/completions -----------------------------------------------------------------------


def _check_prompt_shape(value: object, name: str) -> object:
    """app/prompts.py's shape check, its message re-raised as ValueError so pydantic's 400
    names the field (app/main.py `validation_message`)."""
    try:
        prompt_list(value, name)
    except InvalidRequestError as exc:
        raise ValueError(exc.message) from None
    return value


def prompt_count(prompt: PromptInput) -> int:
    """How many prompts: a string or one id list is one; a list of either is a batch."""
    return len(prompt_list(prompt, "prompt"))


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions` (OpenAI's request, vLLM's extras, our extensions)."""

    prompt: PromptInput
    base_prompt: PromptInput | None = None
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    # Chat's field sent to /v1/completions by clients that share one request builder; vLLM
    # ignores it there too (completions' top-N is `logprobs`).
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt", "base_prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: object, info: Any) -> object:
        if value is None and info.field_name == "base_prompt":
            return None
        return _check_prompt_shape(value, info.field_name)

    def check(self) -> None:
        """Checks of several fields and of unsupported OpenAI fields (InvalidRequestError)."""
        count = prompt_count(self.prompt)
        self._check_common()
        if self.base_prompt is not None and prompt_count(self.base_prompt) != count:
            raise InvalidRequestError(
                f"base_prompt has {prompt_count(self.base_prompt)} prompt(s) but prompt has "
                f"{count}; a list must match prompt's length",
                param="base_prompt",
            )
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError(
                "`echo` with `logprobs` is not supported by this gateway: the prompt tokens' "
                "logprobs of the mixture are not computed",
                param="echo",
            )
        if self.echo and not all(isinstance(p, str) for p in prompt_list(self.prompt, "prompt")):
            raise InvalidRequestError(
                "`echo` needs text prompts here (a token-id prompt's text is not decoded)",
                param="echo",
            )
        if self.suffix:
            raise InvalidRequestError("`suffix` is not supported by this gateway", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError(
                "`best_of` is not supported by this gateway (only best_of == n)", param="best_of"
            )

    def echo_texts(self) -> tuple[str, ...]:
        """`echo`: each prompt's text (check() allows echo with text prompts only)."""
        if not self.echo:
            return ()
        return tuple(p if isinstance(p, str) else "" for p in prompt_list(self.prompt, "prompt"))

    def generation_params(self, settings: Settings) -> generation.GenerationParams:
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

    def to_message(self) -> generation.ChatMessage:
        content = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )
        role = "system" if self.role == "developer" else self.role
        return generation.ChatMessage(role=role, content=content, name=self.name)


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
    # The teacher's chat template (vLLM's fields, passed to its /tokenize); the base's plain
    # rendering ignores them.
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        None
    )

    @field_validator("base_prompt", mode="before")
    @classmethod
    def _base_prompt_shape(cls, value: object) -> object:
        if value is None:
            return None
        checked = _check_prompt_shape(value, "base_prompt")
        if isinstance(checked, list) and checked and not isinstance(checked[0], int):
            raise ValueError("base_prompt of a chat request is one string or one list of ids")
        return checked

    def check(self) -> None:
        """Checks of several fields and of unsupported OpenAI fields (InvalidRequestError)."""
        self._check_common()
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
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequestError(  # vLLM's check and wording
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                param="continue_final_message",
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise InvalidRequestError(
                "continue_final_message needs the last message to be the assistant's",
                param="continue_final_message",
            )
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidRequestError(
                'only response_format {"type": "text"} is supported', param="response_format"
            )

    def generation_params(self, settings: Settings) -> generation.GenerationParams:
        max_tokens = self.max_completion_tokens or self.max_tokens  # None: up to the context
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        param = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        return self._params(settings, max_tokens, logprobs, param)

    def chat_template(self) -> generation.ChatTemplate:
        """The teacher's template options, as vLLM builds them: `reasoning_effort` goes to the
        template as a variable and, unless `chat_template_kwargs` sets `enable_thinking`, sets
        it (false for "none"); a template that does not use a variable ignores it."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
        return generation.ChatTemplate(
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
            kwargs=kwargs,
        )

    def chat_messages(self) -> list[generation.ChatMessage]:
        return [m.to_message() for m in self.messages]

    def base_chat_messages(self) -> list[generation.ChatMessage] | None:
        return None if self.base_messages is None else [m.to_message() for m in self.base_messages]
