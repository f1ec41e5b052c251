"""One validator: a request's generation parameters and prompts checked against the settings
and the upstreams, turned into a `Plan` the generation loop runs.

The HTTP layer checks shapes only (app/protocol.py: types, ranges, fields this gateway does not
implement); everything that needs the settings or the upstreams' limits is checked here, once,
for HTTP, batch and library callers alike: `check_request()` before any prompt is tokenized
(the coordinator's `check()`), `make_plan()` with the token ids (the coordinator's `stream()`
and `generate()` call it, so library callers get the same checks and the same messages).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from app.errors import ContextLengthError, InvalidRequestError
from app.generation import MAX_LOGPROBS, DualPrompt, GenerationParams
from app.sampling import validate_config
from app.sampling.types import SamplingError
from app.settings import Settings
from app.upstream import ModelInfo


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated request."""

    prompts: list[DualPrompt]
    params: GenerationParams
    k: int  # logprobs K asked of each upstream
    eos: frozenset[int]  # ids that end a choice with "stop" (empty with ignore_eos)
    stop_ids: frozenset[int]
    held_ids: frozenset[int]  # held back until min_tokens: EOS (even with ignore_eos) + stop ids
    silent_ids: frozenset[int]  # ids that add no text (special ids with skip_special_tokens)
    stops: tuple[str, ...]  # non-empty stop strings
    incremental: bool  # detokenize after every token (streaming, stop strings)


def check_request(settings: Settings, params: GenerationParams, prompts: int) -> int:
    """Check `params` for `prompts` prompts against the settings; returns the upstream K."""
    if prompts < 1:
        raise InvalidRequestError("no prompt given", param="prompt")
    if params.n < 1:
        raise InvalidRequestError("n must be at least 1", param="n")
    if prompts * params.n > settings.max_n:
        raise InvalidRequestError(
            f"this request asks for {prompts * params.n} choices (prompts x n); "
            f"the limit is {settings.max_n}",
            param="n",
        )
    if params.max_tokens is not None and params.max_tokens < 1:
        raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
    if params.min_tokens < 0:
        raise InvalidRequestError("min_tokens must be at least 0", param="min_tokens")
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        raise InvalidRequestError(  # vLLM's wording
            f"min_tokens must be less than or equal to max_tokens={params.max_tokens}, "
            f"got {params.min_tokens}.",
            param="min_tokens",
        )
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
        raise InvalidRequestError(
            f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs"
        )
    k = params.top_k_upstream if params.top_k_upstream is not None else settings.top_k
    if k < 1:
        raise InvalidRequestError("mixing.top_k must be at least 1", param="mixing.top_k")
    try:
        validate_config(params.mixing)
    except SamplingError as exc:
        raise InvalidRequestError(str(exc), param="mixing") from exc
    if params.seed is not None and params.seed < 0:
        raise InvalidRequestError("seed must be non-negative", param="seed")
    return k


def check_ids(ids: Sequence[int], param: str) -> list[int]:
    """A prompt given as token ids: non-empty, non-negative integers."""
    if not ids:
        raise InvalidRequestError("the prompt is empty", param=param)
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise InvalidRequestError(f"invalid token id {token_id!r} in the prompt", param=param)
    return list(ids)


def make_plan(
    settings: Settings,
    models: Mapping[str, ModelInfo],
    eos_token_ids: Collection[int],
    prompts: Sequence[DualPrompt],
    params: GenerationParams,
    *,
    incremental: bool,
    special_ids: Collection[int] = (),
) -> Plan:
    """Every check of a request with its token ids; `models` are the upstreams' ModelInfo by
    role ("base", "teacher"): a prompt must leave room for at least one generated token."""
    k = check_request(settings, params, len(prompts))
    max_model_len = min(models["teacher"].max_model_len, models["base"].max_model_len)
    if params.max_tokens is not None and params.max_tokens > max_model_len:
        # vLLM's check and wording (its TokenizeParams, with the parameter and value its error
        # response appends); a prompt that leaves less room than max_tokens is not an error
        # there, the output is shortened to the room left ("length"), and here too.
        name = params.max_tokens_param
        raise InvalidRequestError(
            f"{name}={params.max_tokens} cannot be greater than "
            f"max_model_len={max_model_len}. Please request fewer output tokens. "
            f"(parameter={name}, value={params.max_tokens})",
            param=name,
        )
    for p in prompts:
        check_ids(p.teacher, "prompt")
        check_ids(p.base, "base_prompt")
        for name, ids in (("teacher", p.teacher), ("base", p.base)):
            limit = models[name].max_model_len
            if len(ids) >= limit:
                raise ContextLengthError(
                    f"This model's maximum context length is {limit} tokens. However, "
                    f"your {'base ' if name == 'base' else ''}prompt contains {len(ids)} "
                    "tokens, which leaves no room for output. Please reduce the length "
                    "of the prompt.",
                    param="base_prompt" if name == "base" else "prompt",
                )
    stops = tuple(s for s in params.stop if s)
    return Plan(
        prompts=list(prompts),
        params=params,
        k=k,
        eos=frozenset() if params.ignore_eos else frozenset(eos_token_ids),
        stop_ids=frozenset(params.stop_token_ids),
        held_ids=frozenset(eos_token_ids) | frozenset(params.stop_token_ids)
        if params.min_tokens > 0
        else frozenset(),
        silent_ids=frozenset(special_ids) if params.skip_special_tokens else frozenset(),
        stops=stops,
        incremental=incremental or bool(stops),
    )
