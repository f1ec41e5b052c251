"""app/protocol: request validation and the request -> GenerationParams/MixConfig mapping.
No I/O. (The response builders are tested in tests/test_render.py, the settings' checks in
tests/test_plan.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app import protocol
from app.errors import InvalidRequestError
from app.generation import Speculative
from app.main import validation_message
from app.prompts import prompt_list
from app.settings import Settings


def settings(**overrides: Any) -> Settings:
    return Settings(base_url=["http://b"], teacher_url=["http://t"], **overrides)


def completion(**body: Any) -> protocol.CompletionRequest:
    return protocol.CompletionRequest.model_validate({"prompt": "hi", **body})


def chat(**body: Any) -> protocol.ChatCompletionRequest:
    return protocol.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **body}
    )


# --- mixing: server defaults, presets, explicit fields --------------------------------------


def test_absent_mixing_keeps_every_server_default() -> None:
    s = settings(alpha=0.3, js_threshold=0.7, trust_region_top_p=0.8)
    config = completion().mix_config(s)
    assert (config.alpha, config.js_threshold, config.trust_region_top_p) == (0.3, 0.7, 0.8)
    assert (config.temperature, config.top_p, config.top_k) == (1.0, 1.0, 0)


def test_presets_set_the_documented_values() -> None:
    s = settings()
    conservative = completion(mixing={"preset": "conservative"}).mix_config(s)
    assert (
        conservative.trust_region_top_p,
        conservative.js_threshold,
        conservative.overlap_threshold,
    ) == (0.90, 0.4, 0.15)
    explore = completion(mixing={"preset": "explore"}).mix_config(s)
    assert explore.force_first_token is False
    assert explore.trust_region_top_p is None
    assert explore.stability_check is False
    balanced = completion(mixing={"preset": "balanced"}).mix_config(settings(js_threshold=0.9))
    assert balanced.js_threshold == 0.5  # the preset wins over the server default


def test_explicit_fields_override_the_preset_and_null_means_off_or_auto() -> None:
    s = settings(alpha=0.2)
    config = completion(
        mixing={"preset": "explore", "trust_region_top_p": 0.5, "alpha": None}
    ).mix_config(s)
    assert config.trust_region_top_p == 0.5
    assert config.alpha is None  # explicit null: automatic α, not the server's 0.2
    off = completion(mixing={"trust_region_top_p": None}).mix_config(s)
    assert off.trust_region_top_p is None
    # null on a boolean/threshold option means "the default"
    kept = completion(mixing={"js_threshold": None}).mix_config(settings(js_threshold=0.3))
    assert kept.js_threshold == 0.3


def test_generation_params_mapping() -> None:
    s = settings()
    params = completion(
        stop="\n",
        seed=-1,
        n=2,
        temperature=0,
        top_p=0.9,
        top_k=-1,
        logprobs=3,
        stop_token_ids=[7],
        ignore_eos=True,
        include_stop_str_in_output=True,
        max_tokens=None,
        mixing={"top_k": 10},
    ).generation_params(s)
    assert params.stop == ("\n",)
    assert params.seed == 2**64 - 1  # seeds are taken modulo 2**64
    assert (params.n, params.logprobs, params.top_k_upstream, params.max_tokens) == (2, 3, 10, 16)
    assert tuple(params.stop_token_ids) == (7,)
    assert params.ignore_eos
    assert params.include_stop_str_in_output
    assert (params.mixing.temperature, params.mixing.top_p, params.mixing.top_k) == (0, 0.9, 0)


def test_chat_params_prefer_max_completion_tokens_and_map_top_logprobs() -> None:
    s = settings()
    params = chat(max_tokens=5, max_completion_tokens=9, logprobs=True).generation_params(s)
    assert (params.max_tokens, params.logprobs) == (9, 0)
    params = chat(logprobs=True, top_logprobs=4).generation_params(s)
    assert (params.max_tokens, params.logprobs) == (None, 4)
    assert chat().generation_params(s).logprobs is None
    request = chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}]}])
    assert [(m.role, m.content) for m in request.chat_messages()] == [("system", "a")]


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": [-3]}, "prompt"),
        ({"mixing": {"alpha": 1.5}}, "mixing.alpha"),
        ({"mixing": {"preset": "wild"}}, "mixing.preset"),
        ({"mixing": {"speculative": 4}}, "mixing.speculative"),
        ({"mixing": {"alpah": 0.5}}, "mixing.alpah"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_pydantic_errors_name_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as info:
        completion(**body)
    errors = [dict(e, loc=("body", *e["loc"])) for e in info.value.errors()]
    message, named = validation_message(errors)
    assert named == param
    assert param.split(".")[-1].split("[")[0] in message


def test_speculative_resolution() -> None:
    """Absent: the server's setting (or the preset's); null: off; an object: its values."""
    s = settings()
    assert completion()._params(s, 16, None).speculative is None
    spec = completion(mixing={"speculative": {"k": 4, "drafter": "base"}})._params(s, 16, None)
    assert spec.speculative == Speculative(k=4, drafter="base")
    auto = completion(mixing={"speculative": {}})._params(s, 16, None).speculative
    assert auto == Speculative(k=None, drafter="auto")
    fast = completion(mixing={"preset": "fast"})._params(s, 16, None)
    assert fast.speculative == Speculative()
    assert fast.mixing == completion()._params(s, 16, None).mixing
    on = settings(speculative={"k": 3})
    assert completion()._params(on, 16, None).speculative == Speculative(k=3)
    assert completion(mixing={"speculative": None})._params(on, 16, None).speculative is None
    assert completion(mixing={"preset": "explore"})._params(
        on, 16, None
    ).speculative == Speculative(k=3)


@pytest.mark.parametrize(
    "value", [4, {"k": 0}, {"k": 17}, {"k": "many"}, {"drafter": "both"}, {"kk": 2}]
)
def test_bad_speculative_options_name_the_field(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        completion(mixing={"speculative": value})
    errors = [dict(e, loc=("body", *e["loc"])) for e in info.value.errors()]
    _, named = validation_message(errors)
    assert named is not None
    assert named.startswith("mixing.speculative")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"echo": True, "prompt": [1, 2]}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"five": 1.0}}, "logit_bias"),
        ({"logit_bias": {"-1": 1.0}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": ["a", "b"], "base_prompt": "c"}, "base_prompt"),
    ],
)
def test_semantic_checks_name_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        completion(**body).check()
    assert info.value.param == param


def test_neutral_values_of_unsupported_fields_pass() -> None:
    completion(
        echo=False,
        best_of=1,
        logit_bias={},
        presence_penalty=0,
        frequency_penalty=0.0,
        prompt=[[1, 2], [3]],
        base_prompt=["a", "b"],
    ).check()


IGNORED = {
    "user": "u-1",
    "metadata": {"run": "7"},
    "store": False,
    "service_tier": "auto",
    "prompt_cache_key": "k",
    "safety_identifier": "s",
    "n": None,
}


def test_ignored_fields_are_accepted_and_change_nothing() -> None:
    s = settings()
    plain_c, plain_chat = completion(), chat(max_tokens=5)
    c = completion(**IGNORED, top_logprobs=3, best_of=1)
    c.check()
    assert c.n == 1
    assert c.generation_params(s) == plain_c.generation_params(s)
    ch = chat(**IGNORED, max_tokens=5, parallel_tool_calls=False)
    ch.check()
    assert ch.generation_params(s) == plain_chat.generation_params(s)


@pytest.mark.parametrize("body", [{"metadat": {}}, {"mixing": {"alpah": 0.5}}, {"n": 0}])
def test_typos_and_bad_values_next_to_ignored_fields_still_fail(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        completion(**{**IGNORED, **body})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"base_prompt": "x", "base_messages": [{"role": "user", "content": "y"}]}, "base_prompt"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_chat_semantic_checks(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        chat(**body).check()
    assert info.value.param == param


def test_prompt_count() -> None:
    assert protocol.prompt_count("a") == 1
    assert protocol.prompt_count([1, 2, 3]) == 1
    assert protocol.prompt_count(["a", "b"]) == 2
    assert protocol.prompt_count([[1], [2], [3]]) == 3


def test_validation_message_for_bad_json_and_missing_body() -> None:
    assert validation_message([{"loc": ("body", 1), "type": "json_invalid", "msg": "x"}]) == (
        "the request body is not valid JSON",
        None,
    )
    assert validation_message([{"loc": ("body",), "type": "missing", "msg": "x"}])[1] is None
    _message, param = validation_message(
        [{"loc": ("body", "messages", 0, "content", "str"), "type": "string_type", "msg": "m"}]
    )
    assert param == "messages[0].content"


@pytest.mark.parametrize(
    "prompt", ["", [], 5, [1, "a"], [True], ["a", ""], [-3], [[1], []], [[1, -1]]]
)
def test_prompt_shape_errors_are_prompt_lists_messages(prompt: object) -> None:
    # One shape check (app/prompts.py) for HTTP and library callers: pydantic's 400 carries
    # its message unchanged.
    with pytest.raises(InvalidRequestError) as direct:
        prompt_list(prompt, "prompt")
    with pytest.raises(ValidationError) as info:
        completion(prompt=prompt)
    errors = [dict(e, loc=("body", *e["loc"])) for e in info.value.errors()]
    assert validation_message(errors) == (f"invalid `prompt`: {direct.value.message}", "prompt")
    assert direct.value.param == "prompt"


def test_vllm_sampling_parameters_reach_the_mix_config() -> None:
    s = settings()
    params = completion(
        min_p=0.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias={"7": 250, "3": -1.5},
        min_tokens=4,
    ).generation_params(s)
    assert params.min_tokens == 4
    mixing = params.mixing
    assert (mixing.min_p, mixing.presence_penalty, mixing.frequency_penalty) == (0.1, 0.5, -0.5)
    assert mixing.repetition_penalty == 1.2
    assert mixing.logit_bias == ((3, -1.5), (7, 100.0))  # clamped to [-100, 100] as in vLLM


def test_skip_special_tokens_defaults_to_true_and_spaces_between_is_accepted() -> None:
    s = settings()
    assert completion().generation_params(s).skip_special_tokens is True
    params = chat(skip_special_tokens=False, spaces_between_special_tokens=False)
    assert params.generation_params(s).skip_special_tokens is False
