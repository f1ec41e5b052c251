"""Prompts as both models see them: the OpenAI prompt union tokenized on each upstream, the
teacher's chat template (applied by the teacher's server) and the base model's plain rendering
of chat messages (`Settings.base_*_format`). Ids pass through untouched (no re-tokenization).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.errors import InvalidRequestError
from app.generation import ChatMessage, ChatTemplate, DualPrompt
from app.pair import UpstreamPair
from app.plan import check_ids
from app.settings import Settings
from app.tasks import both, task_group
from app.upstream import UpstreamClient

PromptInput = str | list[int] | list[str] | list[list[int]]


def _is_id(item: object) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def prompt_list(value: object, param: str) -> list[str | list[int]]:
    """The prompt union (`PromptInput`: text, ids, or a batch of either) as a list of prompts.

    The one shape check of a prompt, for HTTP (app/protocol.py's validator) and library
    callers alike: raises InvalidRequestError naming `param`, with one readable message
    instead of one per union member."""

    def invalid(message: str) -> InvalidRequestError:
        return InvalidRequestError(message, param=param)

    if isinstance(value, str):
        if not value:
            raise invalid(f"{param} must not be empty")
        return [value]
    if not isinstance(value, list) or not value:
        raise invalid(
            f"{param} must be a non-empty string, a list of token ids, a list of strings "
            "or a list of lists of token ids"
        )
    if all(isinstance(item, str) for item in value):
        if not all(value):
            raise invalid(f"{param} must not contain empty strings")
        return list(value)
    if all(_is_id(item) for item in value):
        if any(item < 0 for item in value):
            raise invalid(f"{param}: token ids must be >= 0")
        return [list(value)]
    if all(isinstance(item, list) for item in value):
        for sub in value:
            if not sub:
                raise invalid(f"{param} must not contain empty token lists")
            if not all(_is_id(i) and i >= 0 for i in sub):
                raise invalid(f"{param}: token ids must be integers >= 0")
        return [list(sub) for sub in value]
    raise invalid(
        f"{param} must be a string, a list of token ids, a list of strings "
        "or a list of lists of token ids (not a mix)"
    )


def _message(m: ChatMessage) -> dict[str, str]:
    message = {"role": m.role, "content": m.content}
    if m.name is not None:
        message["name"] = m.name
    return message


def render_base_chat(settings: Settings, messages: Sequence[ChatMessage]) -> str:
    """The base model's plain rendering of chat messages (Settings.base_*_format); the batch
    job renders its datasets' conversations with it too."""
    formats = {
        "system": settings.base_system_format,
        "developer": settings.base_system_format,
        "user": settings.base_user_format,
        "assistant": settings.base_assistant_format,
    }
    return "".join(
        formats.get(m.role, settings.base_user_format).format(content=m.content) for m in messages
    )


class PromptBuilder:
    """Builds `DualPrompt`s with the pair's tokenizers (the upstreams' /tokenize)."""

    def __init__(self, pair: UpstreamPair) -> None:
        self.pair = pair

    async def completion_prompts(
        self,
        prompt: PromptInput,
        base_prompt: PromptInput | None = None,
    ) -> list[DualPrompt]:
        """Tokenize text prompts on each upstream (ids pass through)."""
        teachers = prompt_list(prompt, "prompt")
        bases = teachers if base_prompt is None else prompt_list(base_prompt, "base_prompt")
        if len(bases) != len(teachers):
            raise InvalidRequestError(
                f"base_prompt has {len(bases)} prompts but prompt has {len(teachers)}",
                param="base_prompt",
            )

        async def ids(client: UpstreamClient, item: str | list[int], param: str) -> list[int]:
            if isinstance(item, str):
                if not item:
                    raise InvalidRequestError("the prompt is empty", param=param)
                return await client.tokenize(item, add_special_tokens=True)
            return check_ids(item, param)

        base_param = "prompt" if base_prompt is None else "base_prompt"
        async with task_group() as group:
            teacher_tasks = [
                group.create_task(ids(self.pair.teacher, p, "prompt")) for p in teachers
            ]
            base_tasks = [group.create_task(ids(self.pair.base, p, base_param)) for p in bases]
        return [
            DualPrompt(teacher=t.result(), base=b.result())
            for t, b in zip(teacher_tasks, base_tasks, strict=True)
        ]

    async def chat_prompt(
        self,
        messages: Sequence[ChatMessage],
        base_messages: Sequence[ChatMessage] | None = None,
        base_prompt: str | list[int] | None = None,
        template: ChatTemplate | None = None,
    ) -> DualPrompt:
        """Teacher: its own chat template (upstream /tokenize with messages), with `template`'s
        options. Base: base_prompt, else base_messages or messages rendered with the plain
        template (which ignores `template` and message names)."""
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")

        async def base_ids() -> list[int]:
            if isinstance(base_prompt, list):
                return check_ids(base_prompt, "base_prompt")
            if isinstance(base_prompt, str):
                text = base_prompt
            else:
                text = render_base_chat(self.pair.settings, base_messages or messages)
            if not text:
                raise InvalidRequestError("the base prompt is empty", param="base_prompt")
            return await self.pair.base.tokenize(text, add_special_tokens=True)

        template = template or ChatTemplate()
        options: dict[str, Any] = {}
        # Only what differs from vLLM's defaults is sent: a default request's body is unchanged.
        if template.continue_final_message:
            options["continue_final_message"] = True
        if template.kwargs:
            options["chat_template_kwargs"] = dict(template.kwargs)
        teacher, base = await both(
            self.pair.teacher.tokenize_chat(
                [_message(m) for m in messages],
                add_generation_prompt=template.add_generation_prompt,
                template_options=options,
            ),
            base_ids(),
        )
        return DualPrompt(teacher=teacher, base=base)
