"""The batch file of `dual-vllm run-batch`: reading OpenAI batch lines and writing vLLM's
output records (app/batch/runbatch.py runs them; docs/BATCH.md).

Input lines are `{"custom_id", "method", "url", "body"}` objects; a line that cannot be sent
(not JSON, not an object, a bad custom_id, a method other than POST, an unknown url,
`"stream": true`) is kept with the reason, so it gets its own 400 record and costs the others
nothing. Output records have vLLM's shape: `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from app.batch.writer import StoreError

URLS = ("/v1/completions", "/v1/chat/completions")
STREAM_ERROR = "Request must not be sent in stream mode"  # vLLM's run_batch wording


class InputError(ValueError):
    """The batch input cannot be read at all (missing file, failed download, not UTF-8)."""


# --------------------------------------------------------------------------------------------
# Input lines


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One non-empty input line. `error` is set for a line the API never sees; `key` is the
    store key (`custom_id:<id>`, or `line:<n>` without a usable custom_id)."""

    number: int
    key: str
    custom_id: str | None
    digest: str
    url: str = ""
    body: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None


def _check(value: Any) -> str | None:
    """Why a parsed line cannot be sent (None if it can)."""
    if not isinstance(value, dict):
        return "a batch line must be a JSON object with custom_id, method, url and body"
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "`custom_id` must be a non-empty string"
    method = value.get("method")
    if method != "POST":
        return f"method {method!r} is not supported; only POST"
    url = value.get("url")
    if url not in URLS:
        return f"URL {url} was used. Supported endpoints: {', '.join(URLS)}"
    body = value.get("body")
    if not isinstance(body, dict):
        return "`body` must be a JSON object (the request body)"
    if body.get("stream") is True:
        return STREAM_ERROR
    return None


def parse_lines(text: str) -> list[BatchLine]:
    """Every non-empty line, checked; problems become the line's `error`, never an exception.
    A custom_id seen on an earlier line makes this line an error (custom_ids must be unique:
    they are how outputs are matched to inputs, and how a rerun finds a line again)."""
    lines: list[BatchLine] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped:
            continue
        digest = hashlib.sha256(stripped.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            why = f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})"
            lines.append(BatchLine(number, f"line:{number}", None, digest, error=why))
            continue
        raw_id = value.get("custom_id") if isinstance(value, dict) else None
        custom_id = raw_id if isinstance(raw_id, str) and raw_id else None
        error = _check(value)
        key = f"line:{number}"
        if custom_id is not None:
            if custom_id in first_line:
                error = (
                    f"duplicate custom_id {custom_id!r} (first on line {first_line[custom_id]}); "
                    "custom_ids must be unique"
                )
            else:
                first_line[custom_id] = number
                key = f"custom_id:{custom_id}"
        if error is not None:
            lines.append(BatchLine(number, key, custom_id, digest, error=error))
        else:
            lines.append(BatchLine(number, key, custom_id, digest, value["url"], value["body"]))
    return lines


def read_input(source: str, stdin: TextIO | None = None) -> str:
    """A local path, `-` for stdin, or an http(s) URL (fetched with one GET)."""
    try:
        if source == "-":
            return (stdin or sys.stdin).read()
        if source.startswith(("http://", "https://")):
            response = httpx.get(source, follow_redirects=True, timeout=60)
            response.raise_for_status()
            return response.text
        return Path(source).read_text(encoding="utf-8")
    except httpx.HTTPError as exc:
        raise InputError(f"could not download {source}: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {source}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Output records


def output_record(
    line: BatchLine,
    status_code: int,
    *,
    body: Any = None,
    error: Any = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """vLLM's BatchRequestOutput (run_batch.py): id, custom_id, response, error."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": {
            "status_code": status_code,
            "request_id": request_id or f"req_{uuid.uuid4().hex}",
            "body": body,
        },
        "error": error,
    }


def retryable(status: int) -> bool:
    return status >= 500 or status == 429


def partial_path(output: Path) -> Path:
    """The resumable store next to the output."""
    return output.with_name(output.name + ".partial.jsonl")


def store_path(output: Path) -> Path:
    if output.is_dir():
        raise StoreError(f"{output} is a directory; give a file name")
    return partial_path(output)
