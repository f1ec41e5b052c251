"""`dual-vllm generate`: a dataset of prompts in, one JSONL record per sample out (docs/BATCH.md).

This module is the command line: the arguments, Settings and a Job from them, and the exit
codes (0 done, 1 some samples failed, 2 unusable settings/inputs/upstreams, 3 aborted after
consecutive upstream failures, 130 interrupted). The job itself: app.batch.job (what is sent),
app.batch.runner (the run), app.batch.records (what is written).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.batch.datasets import FORMATS, DatasetError, parse_shard
from app.batch.export import OUTPUT_FORMATS, ExportError, detect_output_format
from app.batch.gateway import GatewayBackend
from app.batch.job import Job, Templates
from app.batch.records import Totals
from app.batch.runner import JobAborted, run_job
from app.batch.writer import StoreError
from app.errors import DualVLLMError
from app.generation import GenerationParams, Speculative
from app.options import PRESETS, SpeculativeOptions, resolve_mixing, resolve_speculative
from app.settings import Settings
from app.upstream import StartupError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where it tells something: not when the help already says
    what the default is, nor for None (unset; the help or the group says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # Nor for an off switch (False) or an empty repeatable option: "(default: [])".
        if action.default in (None, False, []) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _optional_float(text: str) -> float | None:
    if text.lower() in {"none", "null", "off"}:
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', not {text!r}") from None


def _speculative(text: str) -> int | str | None:
    """`--speculative`: a k, 'auto', or 'off'/'none' (token by token)."""
    if text.lower() in {"off", "none", "null"}:
        return None
    if text.lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number, 'auto' or 'off', not {text!r}"
        ) from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
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
    data.add_argument("--limit", type=positive_int, help="use only the first N rows")
    data.add_argument("--shard", type=str, help="I/N: this job's share of the dataset")

    out = parser.add_argument_group("output")
    out.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="output: a JSONL file (resumable), a .parquet file or, with --output-format hf, "
        "a datasets folder (both written at the end from <output>.partial.jsonl)",
    )
    out.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        help="jsonl, parquet, or hf (a Hugging Face datasets folder; needs the `datasets` "
        "package) (default: parquet for a .parquet/.pq output, else jsonl)",
    )
    out.add_argument(
        "--completion-order",
        action="store_true",
        help="keep the finished file in the order samples completed (default: dataset order, "
        "then sample index)",
    )
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
    gen.add_argument("-n", "--samples", type=positive_int, default=1, help="samples per prompt")
    gen.add_argument("--max-tokens", type=positive_int, default=256, help="completion length limit")
    gen.add_argument("--seed", type=int, default=0, help="job seed; each sample's derives from it")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)"
    )
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS")
    gen.add_argument(
        "--temperature", type=float, default=1.0, help="applied to both models before mixing"
    )
    gen.add_argument("--top-p", type=float, default=1.0, help="OpenAI/vLLM top_p applied to q")
    gen.add_argument(
        "--sample-top-k", type=int, default=0, help="OpenAI/vLLM top_k applied to q (0 = off)"
    )
    gen.add_argument("--concurrency", type=positive_int, default=8, help="samples in flight")
    gen.add_argument("--retries", type=int, default=3, help="retries of upstream failures")
    gen.add_argument("--retry-backoff", type=float, default=1.0, help="first retry delay (doubles)")
    gen.add_argument(
        "--max-consecutive-failures",
        type=int,
        default=32,
        help="stop the job when this many samples in a row fail with upstream errors (0: never)",
    )

    mix = parser.add_argument_group("mixing (README.md `mixing.*`; default: the server settings)")
    mix.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="start from this preset's full values; the options below override it",
    )
    mix.add_argument(
        "--alpha",
        type=_optional_float,
        default=argparse.SUPPRESS,
        help="fixed mixing weight (0 = base, 1 = teacher); none = solved at every token",
    )
    mix.add_argument(
        "--force-first-token",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="the first token comes from the teacher alone",
    )
    mix.add_argument(
        "--trust-region-top-p",
        type=_optional_float,
        default=argparse.SUPPRESS,
        metavar="RHO",
        help="restrict both models to the teacher's top-p nucleus first; none = off",
    )
    mix.add_argument(
        "--stability-check",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="run the stability test at every token",
    )
    mix.add_argument(
        "--js-threshold",
        type=float,
        default=argparse.SUPPRESS,
        help="unstable when the Jensen-Shannon divergence is above this",
    )
    mix.add_argument(
        "--overlap-threshold",
        type=float,
        default=argparse.SUPPRESS,
        help="unstable when the shared top-K mass is below this",
    )
    mix.add_argument(
        "--auto-fallback",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="on an unstable token, use the teacher alone",
    )
    mix.add_argument("--top-k", type=int, help="logprobs K asked of each upstream")
    mix.add_argument(
        "--speculative",
        type=_speculative,
        default=argparse.SUPPRESS,
        metavar="K",
        help="speculative rounds (same output law, fewer upstream requests): K drafted tokens "
        "per round, 'auto' (adapted to the acceptance) or 'off'",
    )
    mix.add_argument(
        "--max-uncertain-mass",
        type=_optional_float,
        default=argparse.SUPPRESS,
        metavar="TV",
        help="fetch more for a token whose uncertain_mass (a bound on its distance to the "
        "full-vocabulary mixture) exceeds this; none = off (docs/ALGORITHM.md §9)",
    )
    mix.add_argument(
        "--drafter",
        choices=["auto", "base", "teacher"],
        default="auto",
        help="who drafts in speculative rounds ('auto': the model closer to q)",
    )

    gw = parser.add_argument_group("gateway (instead of the upstreams)")
    gw.add_argument(
        "--gateway",
        metavar="URL",
        help="generate through a deployed gateway over HTTP (e.g. http://gateway:8000) "
        "instead of talking to the two vLLM servers; the records have the same fields",
    )
    gw.add_argument(
        "--api-key",
        help="the gateway's API key (default: $DUAL_VLLM_API_KEY, else $OPENAI_API_KEY)",
    )

    add_upstream_arguments(parser, "upstreams (default: DUAL_VLLM_* environment)")


def add_upstream_arguments(parser: argparse.ArgumentParser, title: str) -> None:
    """--base-url, --teacher-url, --base-model, --teacher-model (read by settings_from_args)."""
    up = parser.add_argument_group(title)
    up.add_argument("--base-url", help="base vLLM server(s), comma-separated")
    up.add_argument("--teacher-url", help="teacher vLLM server(s), comma-separated")
    up.add_argument("--base-model", help="the base server's model name (default: asked of it)")
    up.add_argument(
        "--teacher-model", help="the teacher server's model name (default: asked of it)"
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("base_url", "teacher_url", "base_model", "teacher_model", "top_k"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    gateway = getattr(args, "gateway", None)
    if gateway:
        # Through a gateway the upstream URLs are never used; the rest of the settings
        # (mixing defaults, base formats, top_k) still shapes every request.
        overrides.update(base_url=[gateway], teacher_url=[gateway])
    return Settings(**overrides)


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("DUAL_VLLM_API_KEY") or os.environ.get("OPENAI_API_KEY")


def speculative_from_args(args: argparse.Namespace, settings: Settings) -> Speculative | None:
    """`--speculative` / `--drafter` over the preset's and the server's setting."""
    given = "speculative" in vars(args)
    options = None
    if given and args.speculative is not None:
        try:
            options = SpeculativeOptions(k=args.speculative, drafter=args.drafter)
        except ValidationError as exc:
            raise SystemExit(f"--speculative: {exc.errors()[0]['msg']}") from None
    return resolve_speculative(settings.speculative_default(), args.preset, options, given)


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
        speculative=speculative_from_args(args, settings),
        max_uncertain_mass=getattr(args, "max_uncertain_mass", settings.max_uncertain_mass),
        diagnostics=args.diagnostics,
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
        output_format=detect_output_format(args.output, args.output_format),
        completion_order=args.completion_order,
    )


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
        if args.gateway:
            url, key = args.gateway, api_key(args)
            return await run_job(
                job, settings, coordinator_factory=lambda _s: GatewayBackend(url, key)
            )
        return await run_job(job, settings)

    try:
        totals = asyncio.run(main())
    except (DatasetError, StoreError, ExportError) as exc:
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
