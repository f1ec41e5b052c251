"""Checks of every value of a parsed request that the field types alone do not catch.

JSON lets a string hold a lone UTF-16 surrogate (`"\\ud800"`) and an integer be arbitrarily
large; Python accepts both, and they fail much later (encoding a body for an upstream, a numpy
integer) as a 500. `check_values` walks the whole parsed request, whatever its fields (so new
fields are covered without touching this module), and raises a 400 naming the parameter:

- a string that is not valid Unicode text (a lone surrogate), anywhere: prompts, messages,
  `base_prompt`, `model`, `stop`, `user`, ...;
- an integer outside the signed 64-bit range (|n| >= 2^63), anywhere but `seed` (which takes
  unsigned 64-bit values too; its own field bounds it).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.errors import InvalidRequestError

INT_LIMIT = 2**63
_UNBOUNDED = frozenset({"seed"})  # fields whose own constraints bound them


def check_values(body: BaseModel) -> None:
    """Raise InvalidRequestError for the first bad string or integer of `body`."""
    _walk(body.model_dump(), "")


def _walk(value: Any, path: str) -> None:
    if isinstance(value, str):
        if not _is_text(value):
            raise InvalidRequestError(
                f"invalid `{path or 'body'}`: the string is not valid Unicode "
                "(it holds a lone surrogate)",
                param=path or None,
            )
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not -INT_LIMIT <= value < INT_LIMIT and path.rsplit(".", 1)[-1] not in _UNBOUNDED:
            raise InvalidRequestError(
                f"invalid `{path or 'body'}`: {value} is out of range (a 64-bit signed integer)",
                param=path or None,
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not _is_text(key):
                raise InvalidRequestError(
                    f"invalid `{path or 'body'}`: a key is not valid Unicode", param=path or None
                )
            _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _walk(item, f"{path}[{index}]")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
