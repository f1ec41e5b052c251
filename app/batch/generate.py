"""`dual-vllm generate`: a dataset of prompts in, one JSONL record per sample out (docs/BATCH.md).

The job: read and map the dataset (app.batch.datasets), keep this shard's prompts, build each
prompt as both models see it (the teacher's chat template via its server, a plain template for
the base), skip the samples the output already holds, then generate the rest with bounded
concurrency through one Coordinator, retrying upstream trouble with backoff, and append each
result to the resumable store (app.batch.writer) the moment it is done. A sample that still
fails is recorded with status "failed" (never dropped) and retried by the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import httpx
from pydantic import ValidationError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from app.batch.datasets import (
    FORMATS,
    DatasetError,
    PromptRow,
    SampleKey,
    parse_shard,
    sample_seed,
)
from app.batch.job import Job, PromptSpec, Templates, check_config, plan
from app.batch.records import Outcome, SampleOutput, Totals, format_summary, sample_record
from app.batch.writer import ResultStore, StoreError
from app.coordinator import (
    ChatMessage,
    Coordinator,
    DualPrompt,
    GenerationParams,
)
from app.errors import DualVLLMError, UpstreamError
from app.options import PRESETS, resolve_mixing
from app.sampling.types import SamplingError
from app.settings import Settings
from app.upstream import StartupError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Command line


def _optional_float(text: str) -> float | None:
    if text.lower() in {"none", "null", "off"}:
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', not {text!r}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    data = parser.add_argument_group("dataset")
    data.add_argument("dataset", help="JSONL/JSON/CSV/Parquet file, or a Hugging Face dataset name")
    data.add_argument("--format", choices=FORMATS, help="file format (default: from the suffix)")
    data.add_argument("--split", default="train", help="Hugging Face split")
    data.add_argument("--hf-config", help="Hugging Face dataset configuration name")
    data.add_argument(
        "--prompt-field",
        default="prompt",
        help="field with the prompt text, or a list of {role, content} messages (a.b = nested)",
    )
    data.add_argument("--id-field", help="field with a unique id (default: the row position)")
    data.add_argument("--limit", type=_positive_int, help="use only the first N rows")
    data.add_argument("--shard", type=str, help="I/N: this job's share of the dataset")

    out = parser.add_argument_group("output")
    out.add_argument("-o", "--output", required=True, type=Path, help="JSONL file (resumable)")
    out.add_argument(
        "--diagnostics",
        action="store_true",
        help="store per-token diagnostics and token text (needed for `report` token colouring)",
    )
    out.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if the output holds samples made with other options",
    )
    out.add_argument(
        "--allow-failed",
        action="store_true",
        help="exit 0 even if some samples are recorded as failed (default: exit 1)",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    out.add_argument(
        "--fsync-interval", type=float, default=1.0, help="seconds between fsyncs of the output"
    )

    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--system-prompt", help="system message for both models")
    prompts.add_argument(
        "--teacher-template",
        help="plain template for the teacher instead of its chat template "
        "({prompt}, {system}, or any dataset field)",
    )
    prompts.add_argument(
        "--base-template",
        help="template for the base model (default: the settings' plain rendering of the "
        "messages, 'Question: {content}\\nAnswer:'); fields as --teacher-template",
    )

    gen = parser.add_argument_group("generation")
    gen.add_argument("-n", "--samples", type=_positive_int, default=1, help="samples per prompt")
    gen.add_argument("--max-tokens", type=_positive_int, default=256)
    gen.add_argument("--seed", type=int, default=0, help="job seed; each sample's derives from it")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--stop-token-id", type=int, action="append", default=[])
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument(
        "--sample-top-k", type=int, default=0, help="OpenAI/vLLM top_k applied to q (0 = off)"
    )
    gen.add_argument("--concurrency", type=_positive_int, default=8, help="samples in flight")
    gen.add_argument("--retries", type=int, default=3, help="retries of upstream failures")
    gen.add_argument("--retry-backoff", type=float, default=1.0, help="first retry delay (doubles)")
    gen.add_argument(
        "--max-consecutive-failures",
        type=int,
        default=32,
        help="stop the job when this many samples in a row fail with upstream errors (0: never)",
    )

    mix = parser.add_argument_group("mixing (API.md `mixing.*`; default: the server settings)")
    mix.add_argument("--preset", choices=sorted(PRESETS))
    mix.add_argument("--alpha", type=_optional_float, default=argparse.SUPPRESS)
    mix.add_argument(
        "--force-first-token", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS
    )
    mix.add_argument(
        "--trust-region-top-p", type=_optional_float, default=argparse.SUPPRESS, metavar="RHO"
    )
    mix.add_argument(
        "--stability-check", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS
    )
    mix.add_argument("--js-threshold", type=float, default=argparse.SUPPRESS)
    mix.add_argument("--overlap-threshold", type=float, default=argparse.SUPPRESS)
    mix.add_argument(
        "--auto-fallback", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS
    )
    mix.add_argument("--top-k", type=int, help="logprobs K asked of each upstream")

    up = parser.add_argument_group("upstreams (default: DUAL_VLLM_* environment)")
    up.add_argument("--base-url", help="base vLLM server(s), comma-separated")
    up.add_argument("--teacher-url", help="teacher vLLM server(s), comma-separated")
    up.add_argument("--base-model")
    up.add_argument("--teacher-model")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("base_url", "teacher_url", "base_model", "teacher_model", "top_k"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


def job_from_args(args: argparse.Namespace, settings: Settings) -> Job:
    mixing = resolve_mixing(
        settings.mixing_defaults(),
        args.preset,
        vars(args),
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.sample_top_k,
    )
    params = GenerationParams(
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_id),
        ignore_eos=args.ignore_eos,
        top_k_upstream=settings.top_k,
        mixing=mixing,
    )
    return Job(
        dataset=args.dataset,
        output=args.output,
        fmt=args.format,
        split=args.split,
        hf_config=args.hf_config,
        prompt_field=args.prompt_field,
        id_field=args.id_field,
        limit=args.limit,
        shard=parse_shard(args.shard) if args.shard else None,
        samples=args.samples,
        seed=args.seed,
        concurrency=args.concurrency,
        retries=max(0, args.retries),
        retry_backoff=max(0.0, args.retry_backoff),
        max_consecutive_failures=max(0, args.max_consecutive_failures),
        templates=Templates(args.system_prompt, args.teacher_template, args.base_template),
        params=params,
        preset=args.preset,
        diagnostics=args.diagnostics,
        allow_config_change=args.allow_config_change,
        quiet=args.quiet,
        fsync_interval=args.fsync_interval,
    )


def _retryable(exc: BaseException) -> bool:
    """Upstream trouble that may pass (5xx, timeouts, connection errors). 4xx-like failures
    (context length, rejected input) and math errors would fail the same way again now."""
    if isinstance(exc, UpstreamError):
        return exc.status >= 500
    return isinstance(exc, httpx.TransportError | TimeoutError)


# Failures recorded against a sample; anything else is a bug and stops the job (resumable).
_SAMPLE_FAILURES = (DualVLLMError, SamplingError, httpx.HTTPError, TimeoutError)


# --------------------------------------------------------------------------------------------
# The run


CoordinatorFactory = Callable[[Settings], Coordinator]


class JobAborted(RuntimeError):
    """Too many samples in a row failed with upstream trouble: the upstreams look down, so
    the job stops instead of marking the rest of the dataset as failed."""


class _Runner:
    def __init__(
        self,
        job: Job,
        settings: Settings,
        coord: Coordinator,
        store: ResultStore,
        totals: Totals,
        bar: tqdm[Any],
    ) -> None:
        self.job = job
        self.settings = settings
        self.coord = coord
        self.store = store
        self.totals = totals
        self.bar = bar
        self.config_hash = job.config_hash()
        self._dual: dict[str, DualPrompt] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._remaining: Counter[str] = Counter()
        self.consecutive_upstream_failures = 0

    async def dual_prompt(self, row: PromptRow, spec: PromptSpec) -> DualPrompt:
        """Tokenize once per prompt (a failure is not cached: the retry tokenizes again)."""
        lock = self._locks.setdefault(row.id, asyncio.Lock())
        async with lock:
            if row.id not in self._dual:
                if spec.teacher_messages is not None:
                    messages = [ChatMessage(m.role, m.content) for m in spec.teacher_messages]
                    dual = await self.coord.chat_prompt(messages, base_prompt=spec.base_text)
                else:
                    (dual,) = await self.coord.completion_prompts(
                        spec.teacher_text or "", base_prompt=spec.base_text
                    )
                self._dual[row.id] = dual
            return self._dual[row.id]

    async def attempt(self, dual: DualPrompt, params: GenerationParams) -> SampleOutput:
        # With diagnostics, per-token text for the report's colouring: the text each token
        # released (a token that ends mid-character or inside a possible stop string
        # releases "").
        (done,) = await self.coord.generate([dual], params, token_text=self.job.diagnostics)
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
                dual = await self.dual_prompt(row, spec)
                return Outcome(attempt, dual, output=await self.attempt(dual, params))
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
            models={role: info.name for role, info in self.coord.models.items()},
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
    with ResultStore(job.output, fsync_interval=job.fsync_interval) as store:
        if store.state.truncated_bytes:
            log.warning(
                "dropped a torn last line (%d bytes) of %s: an interrupted write",
                store.state.truncated_bytes,
                job.output,
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
                    runner = _Runner(job, settings, coord, store, totals, bar)
                    await runner.run(pending)
        if store.state.superseded:
            compacted = store.compact(order)
    stdout.write(format_summary(totals, job.output, compacted))
    stdout.flush()
    return totals


def _settings_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"])
        parts.append(
            f"{name}: {error['msg']} (set DUAL_VLLM_{name.upper()} or --{name.replace('_', '-')})"
        )
    return "invalid settings: " + "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        job = job_from_args(args, settings)
    except ValidationError as exc:
        sys.stderr.write(f"dual-vllm generate: {_settings_error(exc)}\n")
        return 2
    except DatasetError as exc:
        sys.stderr.write(f"dual-vllm generate: {exc}\n")
        return 2

    async def main() -> Totals:
        # SIGTERM (Kubernetes pod deletion) ends the job like Ctrl-C: the store closes cleanly;
        # the file would be consistent anyway (kill -9 safe), this only flushes the fsync.
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_job(job, settings)

    try:
        totals = asyncio.run(main())
    except (DatasetError, StoreError) as exc:
        sys.stderr.write(f"dual-vllm generate: {exc}\n")
        return 2
    except JobAborted as exc:
        sys.stderr.write(f"dual-vllm generate: {exc}\n")
        return 3
    except StartupError as exc:  # the coordinator's start-up checks
        sys.stderr.write(f"dual-vllm generate: {exc}\n")
        return 2
    except DualVLLMError as exc:
        sys.stderr.write(f"dual-vllm generate: {exc.message}\n")
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.stderr.write(
            "dual-vllm generate: interrupted; finished samples are saved, rerun the same "
            "command to resume\n"
        )
        return 130
    return 1 if totals.failed and not args.allow_failed else 0
