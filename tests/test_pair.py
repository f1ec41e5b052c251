"""app/pair.py: the upstreams' plain data becomes the math's TopK, or a typed 502."""

from __future__ import annotations

import numpy as np
import pytest

from app.errors import UpstreamError
from app.pair import to_topk


def test_to_topk_keeps_every_entry_as_int64_ids() -> None:
    result = to_topk({900: -7.5, 5: -0.1, 17: -2.5, 3: -9999.0}, "base")
    pairs = dict(zip(result.ids.tolist(), result.logprobs.tolist(), strict=True))
    assert pairs == {900: -7.5, 5: -0.1, 17: -2.5, 3: -9999.0}
    assert result.ids.dtype == np.int64


@pytest.mark.parametrize("mapping", [{5: 0.5}, {5: float("nan")}, {}])
def test_unusable_logprobs_are_a_502_naming_the_upstream(mapping: dict[int, float]) -> None:
    with pytest.raises(UpstreamError, match="unusable logprobs") as info:
        to_topk(mapping, "teacher")
    assert type(info.value) is UpstreamError
    assert info.value.status == 502
    assert info.value.upstream == "teacher"
