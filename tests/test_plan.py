"""app/plan.py: the request-level checks against the settings (HTTP, batch and library)."""

from __future__ import annotations

import pytest

from app.errors import InvalidRequestError
from app.generation import DualPrompt, GenerationParams
from app.plan import check_request, make_plan
from app.settings import Settings
from app.upstream import ModelInfo


def test_prompts_times_n_above_max_n_names_n() -> None:
    settings = Settings(base_url=["http://b"], teacher_url=["http://t"], max_n=64)
    with pytest.raises(InvalidRequestError) as info:
        check_request(settings, GenerationParams(n=40), 2)
    assert info.value.param == "n"
    assert info.value.message == ("this request asks for 80 choices (prompts x n); the limit is 64")
    assert check_request(settings, GenerationParams(n=32), 2) == settings.top_k


def _models(teacher: int, base: int) -> dict[str, ModelInfo]:
    return {"teacher": ModelInfo("t", teacher), "base": ModelInfo("b", base)}


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_above_the_context_is_vllms_400(param: str) -> None:
    """vLLM 0.32 refuses max_tokens > max_model_len with this message (its TokenizeParams;
    the error response appends parameter and value) and names the field the client used."""
    settings = Settings(base_url=["http://b"], teacher_url=["http://t"])
    prompt = DualPrompt(teacher=[1, 2, 3], base=[1, 2])
    params = GenerationParams(max_tokens=101, max_tokens_param=param)
    with pytest.raises(InvalidRequestError) as info:
        make_plan(settings, _models(200, 100), [], [prompt], params, incremental=False)
    assert info.value.param == param
    assert info.value.message == (
        f"{param}=101 cannot be greater than max_model_len=100. Please request fewer output "
        f"tokens. (parameter={param}, value=101)"
    )
    # At the limit it is accepted: like vLLM, a prompt that leaves less room than max_tokens
    # shortens the output ("length"), it is not an error.
    plan = make_plan(
        settings,
        _models(200, 100),
        [],
        [prompt],
        GenerationParams(max_tokens=100, max_tokens_param=param),
        incremental=False,
    )
    assert plan.params.max_tokens == 100
