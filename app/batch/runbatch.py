"""`dual-vllm run-batch`: an OpenAI batch file in, vLLM's batch output records out.

Input: one `{"custom_id", "method", "url", "body"}` object per line (OpenAI's batch format, as
`vllm run-batch` reads it), `/v1/completions` and `/v1/chat/completions` lines mixed. Each body
is sent untouched to its url on the real gateway app built in this process (app.main's
`create_app` with its lifespan, under `httpx.ASGITransport`), so every field of a line
(sampling settings, `seed`, `base_prompt`, `mixing`, presets, `model`) means exactly what it
means over HTTP, and an invalid body gets exactly the 400 the HTTP API answers.

Output: one record per input line, in input order, in vLLM's shape::

    {"id": "batch_req_<hex>", "custom_id": "...",
     "response": {"status_code": 200, "request_id": "req_<hex>", "body": {...}}, "error": null}

An error answer of the API has `body` null and the API's error object in `error`; a line the
API never sees (not JSON, unknown url, method not POST, `"stream": true`, a missing or
duplicate custom_id) gets status_code 400 and a message string in `error`, as vLLM does.

Resume: records go to the resumable store of app.batch.writer, `<output>.partial.jsonl`, keyed
by custom_id (by line number for lines without a usable one), each with a hash of its input
line. A rerun skips lines already answered with the same line text, retries lines that failed
with upstream trouble (5xx, 429), and the output file is (re)written atomically from the
store when every line has a record. See docs/BATCH.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
from pydantic import ValidationError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from app.batch.batchfile import (
    BatchLine,
    InputError,
    output_record,
    parse_lines,
    read_input,
    retryable,
    store_path,
)
from app.batch.writer import ResultStore, StoreError, encode_record, final_records
from app.errors import DualVLLMError
from app.settings import Settings
from app.upstream import StartupError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class BatchOptions:
    input: str
    output: str
    concurrency: int = 8
    retries: int = 3
    retry_backoff: float = 1.0
    quiet: bool = False
    fsync_interval: float = 1.0


@dataclass
class BatchTotals:
    lines: int = 0
    skipped: int = 0
    ok: int = 0
    errors: int = 0  # answered with an error that would repeat (4xx, bad lines)
    failed: int = 0  # upstream trouble left after the retries: a rerun retries them
    started: float = field(default_factory=time.monotonic)

    def summary(self, output: str) -> str:
        seconds = time.monotonic() - self.started
        text = (
            f"output: {output}\n"
            f"lines: {self.lines} ({self.skipped} already done, {self.ok} ok, "
            f"{self.errors} error records, {self.failed} failed) in {seconds:.1f} s\n"
        )
        if self.failed:
            text += f"{self.failed} line(s) failed with upstream errors: rerun to retry them\n"
        return text


class _Batch:
    def __init__(
        self,
        options: BatchOptions,
        store: ResultStore,
        totals: BatchTotals,
        bar: tqdm[Any],
    ) -> None:
        self.options = options
        self.store = store
        self.totals = totals
        self.bar = bar

    def record(self, line: BatchLine, output: dict[str, Any], *, failed: bool = False) -> None:
        status_code = output["response"]["status_code"]
        self.store.append(
            {
                "id": line.key,
                "sample_index": 0,
                "status": "failed" if failed else "ok",
                "line": line.number,
                "config_hash": line.digest,
                "output": output,
            }
        )
        if failed:
            self.totals.failed += 1
        elif status_code == 200:
            self.totals.ok += 1
        else:
            self.totals.errors += 1
        self.bar.set_postfix(errors=self.totals.errors, failed=self.totals.failed, refresh=False)
        self.bar.update(1)

    async def send(self, client: httpx.AsyncClient, line: BatchLine) -> None:
        """POST the body to the gateway (retrying 5xx/429 with doubling backoff), record it."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await client.post(line.url, json=line.body)
                status = response.status_code
                try:
                    answer: Any = response.json()
                except ValueError:
                    answer = response.text
            except httpx.HTTPError as exc:
                status, answer = 500, f"the gateway did not answer: {exc!r}"
            if status == 200:
                request_id = answer.get("id") if isinstance(answer, dict) else None
                self.record(line, output_record(line, 200, body=answer, request_id=request_id))
                return
            if not retryable(status) or attempt > self.options.retries:
                output = output_record(line, status, error=answer)
                self.record(line, output, failed=retryable(status))
                return
            delay = self.options.retry_backoff * 2 ** (attempt - 1)
            log.warning(
                "line %s (%s) got HTTP %s; retrying in %.1f s",
                line.number,
                line.custom_id,
                status,
                delay,
            )
            await asyncio.sleep(delay)

    async def run(self, client: httpx.AsyncClient | None, pending: Sequence[BatchLine]) -> None:
        queue: asyncio.Queue[BatchLine] = asyncio.Queue()
        for line in pending:
            queue.put_nowait(line)

        async def worker() -> None:
            while not queue.empty():
                line = queue.get_nowait()
                if line.error is not None or client is None:
                    self.record(line, output_record(line, 400, error=line.error))
                else:
                    await self.send(client, line)

        async with asyncio.TaskGroup() as group:
            for _ in range(min(self.options.concurrency, len(pending))):
                group.create_task(worker())


@contextlib.asynccontextmanager
async def gateway_client(
    settings: Settings,
    *,
    concurrency: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the gateway app built in process (its lifespan runs here: the
    coordinator's start-up checks, then its clients are closed at the end). The app's own
    admission is opened for this caller: no API keys, and room for `concurrency` requests."""
    from app.main import create_app

    own = settings.model_copy(
        update={
            "api_keys": [],
            "max_concurrent_requests": max(settings.max_concurrent_requests, concurrency),
        }
    )
    app = create_app(own, transport=transport)
    async with app.router.lifespan_context(app):
        asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=asgi, base_url="http://dual-vllm.batch", timeout=None
        ) as client:
            yield client


def write_output(destination: str, records: Sequence[Mapping[str, Any]], stdout: TextIO) -> None:
    """The output file, written whole: to a temporary, fsynced, then renamed over the path
    (`-`: stdout)."""
    if destination == "-":
        for record in records:
            stdout.write(encode_record(record).decode("utf-8"))
        stdout.flush()
        return
    path = Path(destination)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            for record in records:
                handle.write(encode_record(record))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


async def run_batch(
    options: BatchOptions,
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> BatchTotals:
    """Run (or resume) a batch file; returns this run's totals. Raises InputError/StoreError
    for unusable input/output, the coordinator's StartupError for unusable upstreams."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    lines = parse_lines(read_input(options.input, stdin))
    totals = BatchTotals(lines=len(lines))
    with contextlib.ExitStack() as stack:
        if options.output == "-":  # nothing to resume into: the store is temporary
            path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "partial"
        else:
            path = store_path(Path(options.output))
        store = stack.enter_context(ResultStore(path, fsync_interval=options.fsync_interval))
        done = store.state.done
        pending = [
            line
            for line in lines
            if (line.key, 0) not in done or store.config_hashes.get((line.key, 0)) != line.digest
        ]
        totals.skipped = totals.lines - len(pending)
        with (
            logging_redirect_tqdm(),
            tqdm(
                total=totals.lines,
                initial=totals.skipped,
                desc="run-batch",
                unit="req",
                disable=options.quiet,
                file=stderr,
                dynamic_ncols=True,
            ) as bar,
        ):
            batch = _Batch(options, store, totals, bar)
            if any(line.error is None for line in pending):
                async with gateway_client(
                    settings, concurrency=options.concurrency, transport=transport
                ) as client:
                    await batch.run(client, pending)
            else:
                await batch.run(None, pending)
        order = {(line.key, 0): rank for rank, line in enumerate(lines)}
        if store.state.superseded:
            store.compact(order)
        latest = {record["id"]: record["output"] for record in final_records(path)}
        write_output(options.output, [latest[line.key] for line in lines], stdout)
    stderr.write(totals.summary(options.output))
    stderr.flush()
    return totals


# --------------------------------------------------------------------------------------------
# The command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from app.batch.cli import HelpFormatter, add_upstream_arguments, positive_int

    parser.formatter_class = HelpFormatter
    parser.description = (
        "Run an OpenAI batch file (one {custom_id, method, url, body} per line; "
        "/v1/completions and /v1/chat/completions) through the gateway in process and write "
        "vLLM's batch output records, one per input line, in input order. Resumable."
    )
    parser.add_argument(
        "-i", "--input-file", required=True, help="batch file: a local path, an http(s) URL or -"
    )
    parser.add_argument(
        "-o",
        "--output-file",
        required=True,
        help="output JSONL (or - for stdout); its resumable store is <output>.partial.jsonl",
    )
    parser.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight")
    parser.add_argument(
        "--retries", type=int, default=3, help="retries of a line answered 5xx or 429"
    )
    parser.add_argument(
        "--retry-backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--fsync-interval", type=float, default=1.0, help="seconds between fsyncs of the store"
    )
    add_upstream_arguments(parser, "upstreams (default: the DUAL_VLLM_* environment, as `serve`)")


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"dual-vllm run-batch: {message}\n")
    return code


def run(args: argparse.Namespace) -> int:
    from app.batch.cli import _settings_error, settings_from_args

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        return _fail(_settings_error(exc), 2)
    options = BatchOptions(
        input=args.input_file,
        output=args.output_file,
        concurrency=args.concurrency,
        retries=max(0, args.retries),
        retry_backoff=max(0.0, args.retry_backoff),
        quiet=args.quiet,
        fsync_interval=args.fsync_interval,
    )

    async def main() -> BatchTotals:
        # SIGTERM ends the run like Ctrl-C: the store closes cleanly (it is kill -9 safe).
        task = asyncio.current_task()
        if task is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_batch(options, settings)

    try:
        totals = asyncio.run(main())
    except (InputError, StoreError, StartupError) as exc:
        return _fail(str(exc), 2)
    except DualVLLMError as exc:
        return _fail(exc.message, 2)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return _fail("interrupted; answered lines are saved, rerun the same command to resume", 130)
    return 1 if totals.failed else 0
