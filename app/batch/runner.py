"""Running a `generate` job: the samples with bounded concurrency through one Coordinator.

run_job plans the job (app.batch.job), skips the samples the output already holds, then
generates the rest: each prompt is tokenized once for all its samples, each sample is one
`Coordinator.generate` call retried on upstream trouble with backoff (the only retry loop of
the batch job), and its record (app.batch.records) is appended to the resumable store
(app.batch.writer) the moment it is done. A sample that still fails is recorded with status
"failed" (never dropped) and retried by the next run; many upstream failures in a row stop the
job (JobAborted) instead of marking the rest of the dataset as failed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TextIO

import httpx
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from app.batch.datasets import PromptRow, SampleKey, sample_seed
from app.batch.export import check_available, export
from app.batch.gateway import GatewayBackend
from app.batch.job import Job, PromptSpec, check_config, plan
from app.batch.records import Outcome, SampleOutput, Totals, format_summary, sample_record
from app.batch.writer import ResultStore, final_records
from app.coordinator import Coordinator
from app.errors import DualVLLMError, UpstreamError
from app.generation import ChatMessage, DualPrompt, GenerationParams
from app.sampling.types import SamplingError
from app.settings import Settings

log = logging.getLogger(__name__)


def _retryable(exc: BaseException) -> bool:
    """Upstream trouble that may pass (5xx, timeouts, connection errors). 4xx-like failures
    (context length, rejected input) and math errors would fail the same way again now."""
    if isinstance(exc, UpstreamError):
        return exc.status >= 500 or exc.status == 429  # 429: a gateway's admission limit
    return isinstance(exc, httpx.TransportError | TimeoutError)


# Failures recorded against a sample; anything else is a bug and stops the job (resumable).
_SAMPLE_FAILURES = (DualVLLMError, SamplingError, httpx.HTTPError, TimeoutError)


# The in-process Coordinator, or a deployed gateway over HTTP (`generate --gateway`).
Backend = Coordinator | GatewayBackend
CoordinatorFactory = Callable[[Settings], Backend]


class JobAborted(RuntimeError):
    """Too many samples in a row failed with upstream trouble: the upstreams look down, so
    the job stops instead of marking the rest of the dataset as failed."""


class _Runner:
    """The pending samples of one run, `job.concurrency` at a time, each appended to the store
    when done; counts the totals and the upstream failures in a row."""

    def __init__(
        self,
        job: Job,
        coord: Backend,
        store: ResultStore,
        totals: Totals,
        bar: tqdm[Any],
    ) -> None:
        self.job = job
        self.coord = coord
        self.store = store
        self.totals = totals
        self.bar = bar
        self.config_hash = job.config_hash()
        self._dual: dict[str, DualPrompt] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._remaining: Counter[str] = Counter()
        self.consecutive_upstream_failures = 0

    async def dual_prompt(self, coord: Coordinator, row: PromptRow, spec: PromptSpec) -> DualPrompt:
        """Tokenize once per prompt (a failure is not cached: the retry tokenizes again)."""
        lock = self._locks.setdefault(row.id, asyncio.Lock())
        async with lock:
            if row.id not in self._dual:
                if spec.teacher_messages is not None:
                    messages = [ChatMessage(m.role, m.content) for m in spec.teacher_messages]
                    dual = await coord.chat_prompt(messages, base_prompt=spec.base_text)
                else:
                    (dual,) = await coord.completion_prompts(
                        spec.teacher_text or "", base_prompt=spec.base_text
                    )
                self._dual[row.id] = dual
            return self._dual[row.id]

    async def attempt(
        self, coord: Coordinator, dual: DualPrompt, params: GenerationParams
    ) -> SampleOutput:
        # With diagnostics, per-token text for the report's colouring: the text each token
        # released (a token that ends mid-character or inside a possible stop string
        # releases "").
        (done,) = await coord.generate([dual], params, token_text=self.job.diagnostics)
        return SampleOutput(
            text=done.text,
            token_ids=list(done.token_ids),
            finish_reason=done.finish_reason,
            stop_reason=done.stop_reason,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            steps=list(done.steps),
            token_text=done.token_text,
        )

    async def attempt_with_retries(
        self, row: PromptRow, spec: PromptSpec, index: int, params: GenerationParams
    ) -> Outcome:
        """The batch job's one retry layer: upstream trouble (`_retryable`) is retried up to
        job.retries times, the delay doubling from job.retry_backoff; any other failure ends
        the sample at once."""
        dual: DualPrompt | None = None
        attempt = 0
        while True:
            attempt += 1
            try:
                if isinstance(self.coord, GatewayBackend):  # one HTTP request per sample
                    return Outcome(attempt, output=await self.coord.sample(spec, params))
                dual = await self.dual_prompt(self.coord, row, spec)
                return Outcome(attempt, dual, output=await self.attempt(self.coord, dual, params))
            except _SAMPLE_FAILURES as exc:
                if not _retryable(exc) or attempt > self.job.retries:
                    return Outcome(attempt, dual, error=exc)
                delay = self.job.retry_backoff * 2 ** (attempt - 1)
                log.warning(
                    "sample %s/%s attempt %s failed (%s); retrying in %.1f s",
                    row.id,
                    index,
                    attempt,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def sample(self, row: PromptRow, spec: PromptSpec, index: int) -> None:
        """Generate sample `index` of `row` (with retries) and append its record, ok or failed.
        Raises JobAborted after job.max_consecutive_failures upstream failures in a row."""
        seed = sample_seed(self.job.seed, (row.id, index))
        started = time.monotonic()
        outcome = await self.attempt_with_retries(
            row, spec, index, replace(self.job.params, seed=seed, n=1)
        )
        record = sample_record(
            self.job,
            row,
            index,
            spec,
            outcome,
            seed=seed,
            models=self.model_names(),
            elapsed_seconds=time.monotonic() - started,
            config_hash=self.config_hash,
        )
        self.store.append(record)
        self._remaining[row.id] -= 1
        if not self._remaining[row.id]:  # all its samples are done: free its prompt ids
            self._dual.pop(row.id, None)
            self._locks.pop(row.id, None)
        output, error = outcome.output, outcome.error
        if output is not None:
            self.totals.add(output)
            self.consecutive_upstream_failures = 0
        else:
            self.totals.failed += 1
            log.error(
                "sample %s/%s failed after %s attempt(s): %s",
                row.id,
                index,
                outcome.attempts,
                error,
            )
        self.bar.set_postfix(self.totals.postfix(), refresh=False)
        self.bar.update(1)
        if output is None and error is not None and _retryable(error):
            self.consecutive_upstream_failures += 1
            limit = self.job.max_consecutive_failures
            if limit and self.consecutive_upstream_failures >= limit:
                raise JobAborted(
                    f"stopped after {limit} consecutive samples failed with upstream errors "
                    f"(last: {error}); the rest is untouched: fix the upstreams and rerun"
                )

    def model_names(self) -> dict[str, str | None]:
        if isinstance(self.coord, GatewayBackend):
            return dict(self.coord.model_names)
        return {role: info.name for role, info in self.coord.models.items()}

    async def run(self, pending: list[tuple[PromptRow, PromptSpec, int]]) -> None:
        queue: asyncio.Queue[tuple[PromptRow, PromptSpec, int]] = asyncio.Queue()
        for item in pending:
            queue.put_nowait(item)
            self._remaining[item[0].id] += 1

        async def worker() -> None:
            while not queue.empty():
                row, spec, index = queue.get_nowait()
                await self.sample(row, spec, index)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.job.concurrency, len(pending))):
                    group.create_task(worker())
        except* JobAborted as aborted:
            # The samples in flight are cancelled, not recorded: they stay pending for the
            # next run, like samples after a kill.
            raise aborted.exceptions[0] from None


async def run_job(
    job: Job,
    settings: Settings,
    *,
    coordinator_factory: CoordinatorFactory = Coordinator,
    stdout: TextIO | None = None,
) -> Totals:
    """Run (or resume) a job; returns the totals of this run. Raises DatasetError/StoreError
    for unusable inputs, the coordinator's start-up error for unusable upstreams."""
    stdout = stdout or sys.stdout
    planned = plan(job, settings)
    order: dict[SampleKey, int] = {}
    for row, _ in planned:
        for index in range(job.samples):
            order[(row.id, index)] = len(order)
    totals = Totals(total=len(order))
    if job.output_format != "jsonl":
        check_available(job.output_format)  # before any generation, not after it
    with ResultStore(job.store_path, fsync_interval=job.fsync_interval) as store:
        if store.state.truncated_bytes:
            log.warning(
                "dropped a torn last line (%d bytes) of %s: an interrupted write",
                store.state.truncated_bytes,
                job.store_path,
            )
        check_config(job, store, set(order))
        done = store.state.done
        pending = [
            (row, spec, index)
            for row, spec in planned
            for index in range(job.samples)
            if (row.id, index) not in done
        ]
        totals.skipped = totals.total - len(pending)
        compacted = 0
        with (
            logging_redirect_tqdm(),
            tqdm(
                total=totals.total,
                initial=totals.skipped,
                desc=f"generate {job.shard}" if job.shard else "generate",
                unit="sample",
                disable=job.quiet,
                file=sys.stderr,
                dynamic_ncols=True,
            ) as bar,
        ):
            if pending:
                async with coordinator_factory(settings) as coord:
                    runner = _Runner(job, coord, store, totals, bar)
                    await runner.run(pending)
        # Every sample was attempted: the file holds each exactly once (its last record), in
        # dataset order (position, then sample index) unless asked to keep completion order.
        if store.state.superseded or (pending and not job.completion_order):
            compacted = store.compact(None if job.completion_order else order)
        if job.output_format != "jsonl":
            export(final_records(job.store_path), job.output, job.output_format, quiet=job.quiet)
    stdout.write(format_summary(totals, job.output, compacted))
    stdout.flush()
    return totals
