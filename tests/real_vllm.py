"""pytest plugin: the two real CPU vLLM servers, once per session (owned by issue 2).

Use the fixture `real_vllm` together with the marker::

    @pytest.mark.real_vllm
    def test_something(real_vllm: RealVLLM) -> None:
        httpx.post(f"{real_vllm.teacher_url}/v1/completions", ...)

It reuses a healthy pair already serving `smollm2-base` / `smollm2-teacher` on the ports
(127.0.0.1:8101 and :8102; override with DUAL_VLLM_TEST_BASE_PORT / DUAL_VLLM_TEST_TEACHER_PORT);
otherwise it runs `dual-vllm local setup` + start in-process and, at the end of the session,
stops only the servers it started. If that fails, every test using it FAILS (never skips).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from app.coordinator import Coordinator
from app.localvllm import LocalVLLMError
from app.localvllm.servers import (
    BASE_MODEL,
    BASE_PORT,
    TEACHER_MODEL,
    TEACHER_PORT,
    default_specs,
    serves,
    start_pair,
    stop_launched,
)
from app.localvllm.setup import Layout, run_setup
from app.settings import Settings


@dataclass(frozen=True)
class RealVLLM:
    base_url: str
    teacher_url: str
    base_model: str = BASE_MODEL
    teacher_model: str = TEACHER_MODEL
    tokenizer: str = ""  # the teacher's model folder (DUAL_VLLM_TOKENIZER)


def _port(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


@pytest.fixture(scope="session")
def real_vllm() -> Iterator[RealVLLM]:
    layout = Layout.from_env()
    specs = default_specs(
        layout,
        _port("DUAL_VLLM_TEST_BASE_PORT", BASE_PORT),
        _port("DUAL_VLLM_TEST_TEACHER_PORT", TEACHER_PORT),
    )
    base, teacher = specs
    pair = RealVLLM(base_url=base.url, teacher_url=teacher.url, tokenizer=str(layout.teacher))
    if all(serves(spec) for spec in specs):
        yield pair
        return
    out = io.StringIO()
    try:
        run_setup(layout, out)
        launches = start_pair(layout, specs, out).launches
    except LocalVLLMError as exc:
        pytest.fail(f"could not bring up the real vLLM pair: {exc}\n{out.getvalue()}")
    sys.stderr.write(out.getvalue())
    try:
        yield pair
    finally:
        # By PID: a server another process (`dual-vllm local start`) launched, even one this
        # session waited for, keeps running.
        stop_launched(layout, launches)


@pytest.fixture
async def real_coordinator(real_vllm: RealVLLM) -> AsyncIterator[Coordinator]:
    """A started engine on the real pair (default settings, the served model names)."""
    settings = Settings(
        base_url=[real_vllm.base_url],
        teacher_url=[real_vllm.teacher_url],
        base_model=real_vllm.base_model,
        teacher_model=real_vllm.teacher_model,
    )
    async with Coordinator(settings) as coordinator:
        yield coordinator
