"""Helpers of the batch tests: a scripted stand-in for the Coordinator (deterministic, with
failure injection) for job logic that must not depend on upstream timing, and small builders."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.batch.cli import add_arguments, job_from_args
from app.batch.job import Job
from app.coordinator import (
    ChatMessage,
    ChatTemplate,
    Completion,
    Coordinator,
    DualPrompt,
    Event,
    FinishEvent,
    GenerationParams,
    TokenEvent,
)
from app.sampling.types import StepResult
from app.settings import Settings
from app.upstream import ModelInfo


def fake_steps(seed: int) -> list[StepResult]:
    """A deterministic step sequence from a sample's seed (3..7 tokens)."""
    rng = np.random.default_rng(seed)
    steps = []
    for position in range(3 + seed % 5):
        token = int(rng.integers(10, 60))
        reason = "first_token" if position == 0 else str(rng.choice(["solved", "unstable"]))
        alpha = 1.0 if reason != "solved" else float(rng.uniform(0.0, 1.0))
        steps.append(
            StepResult(
                token_id=token,
                logprob=-float(rng.uniform(0.1, 2.0)),
                alpha=alpha,
                reason=reason,  # type: ignore[arg-type]
                js=float(rng.uniform(0, 0.3)),
                overlap_count=5,
                overlap_mass=0.9,
                kl_gap=1e-12,
                chernoff=0.01,
                support_size=8,
                filled_mass=0.0,
                support=np.array([token], dtype=np.int64),
                logq=np.array([0.0]),
            )
        )
    return steps


def token_text(token_id: int) -> str:
    return chr(ord("a") + token_id % 26)


class ScriptedCoordinator(Coordinator):
    """Implements the Coordinator's public names used by the batch job.

    `failures[text] = (count, exc_factory)`: the next `count` generations of a prompt whose
    base text contains `text` raise; count < 0 means always.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        failures: dict[str, tuple[int, Callable[[], Exception]]] | None = None,
        calls: Counter[str] | None = None,
    ) -> None:
        self.settings = settings
        self.failures = failures if failures is not None else {}
        self.calls = calls if calls is not None else Counter()
        self._texts: dict[tuple[int, ...], str] = {}
        self._models = {
            "base": ModelInfo("scripted-base", 4096),
            "teacher": ModelInfo("scripted-teacher", 4096),
        }

    @property
    def models(self) -> dict[str, ModelInfo]:
        return self._models

    async def __aenter__(self) -> ScriptedCoordinator:
        self.calls["enter"] += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.calls["exit"] += 1

    def _dual(self, teacher: str, base: str) -> DualPrompt:
        t_ids = list(teacher.encode())
        b_ids = list(base.encode())
        self._texts[tuple(b_ids)] = base
        return DualPrompt(teacher=t_ids, base=b_ids)

    async def chat_prompt(
        self,
        messages: Sequence[ChatMessage],
        base_messages: Sequence[ChatMessage] | None = None,
        base_prompt: str | list[int] | None = None,
        template: ChatTemplate | None = None,
    ) -> DualPrompt:
        self.calls["chat_prompt"] += 1
        teacher = "".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>"
        return self._dual(teacher, str(base_prompt))

    async def completion_prompts(
        self,
        prompt: str | list[int] | list[str] | list[list[int]],
        base_prompt: str | list[int] | list[str] | list[list[int]] | None = None,
    ) -> list[DualPrompt]:
        self.calls["completion_prompts"] += 1
        return [self._dual(str(prompt), str(base_prompt))]

    def _maybe_fail(self, dual: DualPrompt) -> None:
        base = self._texts[tuple(dual.base)]
        for text, (count, factory) in self.failures.items():
            if text in base and count != 0:
                self.failures[text] = (count - 1 if count > 0 else count, factory)
                self.calls["failures"] += 1
                raise factory()

    async def generate(
        self,
        prompts: Sequence[DualPrompt],
        params: GenerationParams,
        *,
        token_text: bool = False,
    ) -> list[Completion]:
        if token_text:  # (the parameter hides this module's token_text() here)
            return [await self._fold(prompts, params)]
        self.calls["generate"] += 1
        (dual,) = prompts
        self._maybe_fail(dual)
        steps = fake_steps(int(params.seed or 0))
        ids = [s.token_id for s in steps]
        return [
            Completion(
                index=0,
                prompt_index=0,
                text="".join(_token_text(i) for i in ids),
                token_ids=ids,
                finish_reason="stop",
                stop_reason=None,
                prompt_tokens=len(dual.teacher),
                completion_tokens=len(ids),
                steps=steps,
                top_logprobs=None,
            )
        ]

    async def _scripted_events(
        self, dual: DualPrompt, params: GenerationParams
    ) -> AsyncGenerator[Event, None]:
        self.calls["stream"] += 1
        self._maybe_fail(dual)
        steps = fake_steps(int(params.seed or 0))
        for i, step in enumerate(steps):
            # Hold back the first token's text (as a split UTF-8 character would be).
            text = "" if i == 0 else token_text(step.token_id)
            yield TokenEvent(0, step.token_id, text, step, None)
        yield FinishEvent(
            0, token_text(steps[0].token_id), "length", None, len(dual.teacher), len(steps)
        )

    async def _fold(self, prompts: Sequence[DualPrompt], params: GenerationParams) -> Completion:
        """`generate(token_text=True)`: the scripted events folded as the Coordinator does."""
        (dual,) = prompts
        ids: list[int] = []
        pieces: list[str] = []
        steps: list[StepResult] = []
        async for event in self.stream(prompts, params):
            if isinstance(event, TokenEvent):
                ids.append(event.token_id)
                pieces.append(event.text)
                steps.append(event.step)
            elif event.text:
                pieces[-1] += event.text
        return Completion(
            index=0,
            prompt_index=0,
            text="".join(pieces),
            token_ids=ids,
            finish_reason="length",
            stop_reason=None,
            prompt_tokens=len(dual.teacher),
            completion_tokens=len(ids),
            steps=steps,
            top_logprobs=None,
            token_text=pieces,
        )

    def stream(
        self, prompts: Sequence[DualPrompt], params: GenerationParams
    ) -> AsyncGenerator[Event, None]:
        (dual,) = prompts
        return self._scripted_events(dual, params)


def parse_job(*argv: str) -> tuple[Job, Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    settings = Settings(base_url=["http://base.test"], teacher_url=["http://teacher.test"])
    return job_from_args(args, settings), settings, args


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


_token_text = token_text
