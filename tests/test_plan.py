"""app/plan.py: the request-level checks against the settings (HTTP, batch and library)."""

from __future__ import annotations

import pytest

from app.errors import InvalidRequestError
from app.generation import GenerationParams
from app.plan import check_request
from app.settings import Settings


def test_prompts_times_n_above_max_n_names_n() -> None:
    settings = Settings(base_url=["http://b"], teacher_url=["http://t"], max_n=64)
    with pytest.raises(InvalidRequestError) as info:
        check_request(settings, GenerationParams(n=40), 2)
    assert info.value.param == "n"
    assert info.value.message == ("this request asks for 80 choices (prompts x n); the limit is 64")
    assert check_request(settings, GenerationParams(n=32), 2) == settings.top_k
