"""`dual-vllm report`: a readable summary of a `generate` output file, with plots.

Writes into `--out-dir`: summary.json, alpha_hist.png (α over all tokens), reasons_by_position.png
(fallback rate and the share of each α rule by token position), alpha_by_position.png (a
samples × positions heat map of α) and report.html, one self-contained page (images embedded
as base64) that also colours the tokens of a few samples by α. Per-token plots need records
written with `generate --diagnostics`; without them the report says so and plots what the
per-sample summaries allow. Reads the file's final view (the last record of each sample), so
it works on unfinished and uncompacted files too.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.batch.writer import StoreError, final_records
from app.sampling.types import REASONS

PLOTS = ("alpha_hist.png", "reasons_by_position.png", "alpha_by_position.png")
_REASON_COLOURS = {
    "first_token": "#7f7f7f",
    "fixed": "#9467bd",
    "unstable": "#d62728",
    "identical": "#bcbd22",
    "single_token": "#17becf",
    "solved": "#1f77b4",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="a JSONL file written by `dual-vllm generate`")
    parser.add_argument(
        "--out-dir", type=Path, help="where to write the report (default: <input>.report/)"
    )
    parser.add_argument("--samples", type=int, default=8, help="samples shown with token colouring")
    parser.add_argument(
        "--max-positions", type=int, default=512, help="token positions shown in the plots"
    )


@dataclass
class Analysis:
    """Everything the report shows, computed once from the records."""

    records: int = 0
    ok: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    finish: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    with_diagnostics: int = 0
    alphas: list[float] = field(default_factory=list)  # per token (diagnostics)
    sample_alpha_means: list[float] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    # position -> Counter of reasons at that position (diagnostics)
    reasons_at: list[Counter[str]] = field(default_factory=list)
    alpha_rows: list[list[float | None]] = field(default_factory=list)
    mixing: Counter[str] = field(default_factory=Counter)

    @property
    def alpha_mean(self) -> float | None:
        if self.alphas:
            return sum(self.alphas) / len(self.alphas)
        if self.sample_alpha_means:
            return sum(self.sample_alpha_means) / len(self.sample_alpha_means)
        return None

    @property
    def fallback_rate(self) -> float | None:
        total = sum(self.reasons.values())
        return self.reasons["unstable"] / total if total else None

    def fallback_by_position(self) -> list[float]:
        return [
            c["unstable"] / total if (total := sum(c.values())) else 0.0 for c in self.reasons_at
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "ok": self.ok,
            "failed": self.failed,
            "errors": dict(self.errors),
            "finish_reasons": dict(self.finish),
            "tokens": self.tokens,
            "mean_tokens_per_sample": (self.tokens / self.ok) if self.ok else None,
            "samples_with_diagnostics": self.with_diagnostics,
            "alpha_mean": self.alpha_mean,
            "alpha_source": "tokens" if self.alphas else "sample means",
            "fallback_rate": self.fallback_rate,
            "reasons": dict(self.reasons),
            "fallback_rate_by_position": self.fallback_by_position(),
            "mixing_configurations": dict(self.mixing),
        }


def analyse(records: Sequence[dict[str, Any]], max_positions: int = 512) -> Analysis:
    result = Analysis(records=len(records))
    for record in records:
        if record.get("status") != "ok":
            result.failed += 1
            error = record.get("error") or {}
            result.errors[str(error.get("type", "unknown"))] += 1
            continue
        result.ok += 1
        result.finish[str(record.get("finish_reason"))] += 1
        result.mixing[json.dumps(record.get("mixing"), sort_keys=True)] += 1
        summary = record.get("summary") or {}
        length = int(summary.get("tokens", len(record.get("completion_token_ids", []))))
        result.tokens += length
        result.lengths.append(length)
        diagnostics = record.get("diagnostics")
        if diagnostics:
            result.with_diagnostics += 1
            alphas: list[float | None] = list(diagnostics.get("alpha", []))
            reasons: list[str] = list(diagnostics.get("reason", []))
            result.alphas.extend(a for a in alphas if a is not None)
            result.reasons.update(reasons)
            for position, reason in enumerate(reasons[:max_positions]):
                while len(result.reasons_at) <= position:
                    result.reasons_at.append(Counter())
                result.reasons_at[position][reason] += 1
            result.alpha_rows.append(alphas[:max_positions])
        else:
            if summary.get("alpha_mean") is not None:
                result.sample_alpha_means.append(float(summary["alpha_mean"]))
            result.reasons.update({k: int(v) for k, v in (summary.get("reasons") or {}).items()})
    return result


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend: no display needed)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def render_plots(analysis: Analysis) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    images: dict[str, bytes] = {}

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    values = analysis.alphas or analysis.sample_alpha_means
    if values:
        ax.hist(values, bins=[i / 40 for i in range(41)], color="#1f77b4", edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no α values", ha="center", va="center", transform=ax.transAxes)
    source = "per token" if analysis.alphas else "per-sample mean (no --diagnostics)"
    ax.set_title(f"α histogram ({source}; 0 = base, 1 = teacher)")
    ax.set_xlabel("α")
    ax.set_ylabel("count")
    ax.set_xlim(0.0, 1.0)
    images["alpha_hist.png"] = _png(fig)
    plt.close(fig)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.2, 5.6), sharex=True)
    if analysis.reasons_at:
        positions = np.arange(len(analysis.reasons_at))
        counts = np.array([sum(c.values()) for c in analysis.reasons_at], dtype=float)
        top.plot(positions, analysis.fallback_by_position(), color=_REASON_COLOURS["unstable"])
        top.set_ylabel("fallback rate")
        top.set_ylim(-0.02, 1.02)
        top.set_title("Fallback (reason 'unstable') by token position")
        shares = [
            np.array([c[r] for c in analysis.reasons_at], dtype=float) / np.maximum(counts, 1)
            for r in REASONS
        ]
        bottom.stackplot(
            positions,
            *shares,
            labels=list(REASONS),
            colors=[_REASON_COLOURS[r] for r in REASONS],
        )
        bottom.set_ylabel("share of steps")
        bottom.set_xlabel("token position")
        bottom.set_ylim(0, 1)
        bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    else:
        top.text(
            0.5,
            0.5,
            "no per-token diagnostics: rerun generate with --diagnostics",
            ha="center",
            va="center",
            transform=top.transAxes,
        )
    images["reasons_by_position.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    if analysis.alpha_rows:
        width = max(len(row) for row in analysis.alpha_rows) or 1
        grid = np.full((len(analysis.alpha_rows), width), np.nan)
        for i, row in enumerate(analysis.alpha_rows):
            grid[i, : len(row)] = [np.nan if a is None else a for a in row]
        image = ax.imshow(
            np.ma.masked_invalid(grid),
            aspect="auto",
            interpolation="nearest",
            cmap="coolwarm",
            vmin=0.0,
            vmax=1.0,
        )
        fig.colorbar(image, ax=ax, label="α")
        ax.set_xlabel("token position")
        ax.set_ylabel("sample")
    else:
        ax.text(0.5, 0.5, "no per-token diagnostics", ha="center", va="center")
    ax.set_title("α by sample and position (blank: past the end or single token)")
    images["alpha_by_position.png"] = _png(fig)
    plt.close(fig)
    return images


# --------------------------------------------------------------------------------------------
# HTML


def _alpha_colour(alpha: float | None) -> str:
    """Diverging blue (α=0, base) -> white (0.5) -> red (α=1, teacher); grey when undefined."""
    if alpha is None or not math.isfinite(alpha):
        return "#dddddd"
    a = min(1.0, max(0.0, alpha))
    r: float
    g: float
    b: float
    if a < 0.5:
        t = a / 0.5
        r, g, b = 80 + 175 * t, 130 + 125 * t, 255
    else:
        t = (a - 0.5) / 0.5
        r, g, b = 255, 255 - 150 * t, 255 - 150 * t
    return f"#{int(r):02x}{int(g):02x}{int(b):02x}"


def colour_tokens(record: dict[str, Any]) -> str:
    """One sample's completion as spans coloured by α, with the step data on hover."""
    diagnostics = record.get("diagnostics") or {}
    pieces = diagnostics.get("token_text")
    alphas = diagnostics.get("alpha") or []
    if not pieces or len(pieces) != len(alphas):
        return f"<pre>{html.escape(str(record.get('completion', '')))}</pre>"
    reasons = diagnostics.get("reason") or [""] * len(alphas)
    js = diagnostics.get("js") or [None] * len(alphas)
    ids = diagnostics.get("token_ids") or [None] * len(alphas)
    spans = []
    for piece, alpha, reason, js_value, token_id in zip(
        pieces, alphas, reasons, js, ids, strict=False
    ):
        alpha_text = "null" if alpha is None else f"{alpha:.3f}"
        js_text = "null" if js_value is None else f"{js_value:.3f}"
        title = f"id {token_id} | α {alpha_text} | {reason} | js {js_text}"
        text = html.escape(piece) if piece else "&#8203;"
        spans.append(
            f'<span style="background:{_alpha_colour(alpha)}" title="{html.escape(title)}">'
            f"{text}</span>"
        )
    return '<pre class="tokens">' + "".join(spans) + "</pre>"


def _prompt_text(record: dict[str, Any]) -> str:
    teacher = (record.get("prompt") or {}).get("teacher") or {}
    if "messages" in teacher:
        return "\n".join(f"[{m['role']}] {m['content']}" for m in teacher["messages"])
    return str(teacher.get("text", ""))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_html(
    analysis: Analysis,
    images: dict[str, bytes],
    records: Sequence[dict[str, Any]],
    source: Path,
    samples: int,
) -> str:
    rows = [
        ("records (samples)", str(analysis.records)),
        ("ok / failed", f"{analysis.ok} / {analysis.failed}"),
        ("tokens", str(analysis.tokens)),
        (
            "mean tokens per sample",
            _fmt(analysis.tokens / analysis.ok if analysis.ok else None, ".1f"),
        ),
        ("α mean", _fmt(analysis.alpha_mean, ".4f")),
        ("fallback rate", _fmt(analysis.fallback_rate, ".2%")),
        ("finish reasons", ", ".join(f"{k}: {v}" for k, v in sorted(analysis.finish.items()))),
        ("steps by reason", ", ".join(f"{k}: {v}" for k, v in sorted(analysis.reasons.items()))),
        ("failures by type", ", ".join(f"{k}: {v}" for k, v in sorted(analysis.errors.items()))),
        ("samples with per-token diagnostics", str(analysis.with_diagnostics)),
    ]
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v or '-')}</td></tr>" for k, v in rows
    )
    figures = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{name}</figcaption></figure>'
        for name, data in images.items()
    )
    shown = [r for r in records if r.get("status") == "ok"][: max(0, samples)]
    sample_html = []
    for record in shown:
        summary = record.get("summary") or {}
        head = (
            f"id {record.get('id')} · sample {record.get('sample_index')} · "
            f"{summary.get('tokens')} tokens · α mean {_fmt(summary.get('alpha_mean'), '.3f')} · "
            f"fallback {_fmt(summary.get('fallback_rate'), '.1%')} · "
            f"finish {record.get('finish_reason')}"
        )
        sample_html.append(
            f"<section><h3>{html.escape(head)}</h3>"
            f"<details><summary>prompt</summary><pre>{html.escape(_prompt_text(record))}</pre>"
            f"</details>{colour_tokens(record)}</section>"
        )
    legend = "".join(
        f'<span style="background:{_alpha_colour(a)}">&nbsp;α={a:.2f}&nbsp;</span>'
        for a in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>dual-vllm report: {html.escape(source.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
th {{ text-align: left; padding-right: 1em; }}
figure {{ display: inline-block; margin: 0.5em; }}
pre {{ white-space: pre-wrap; background: #f8f8f8; padding: 0.5em; }}
pre.tokens span {{ border-radius: 2px; }}
</style></head><body>
<h1>dual-vllm report</h1>
<p>{html.escape(str(source))}</p>
<table>{table}</table>
<h2>Plots</h2>{figures}
<h2>Samples coloured by α</h2>
<p>{legend} &nbsp; grey: α undefined (single token in the trust region). Hover a token for
its step.</p>
{"".join(sample_html) or "<p>no successful samples</p>"}
</body></html>
"""


def format_text(analysis: Analysis, out_dir: Path) -> str:
    summary = analysis.as_dict()
    lines = [
        f"samples: {summary['records']} ({summary['ok']} ok, {summary['failed']} failed)",
        f"tokens: {summary['tokens']} "
        f"(mean {_fmt(summary['mean_tokens_per_sample'], '.1f')} per sample)",
        f"alpha mean: {_fmt(summary['alpha_mean'], '.4f')} ({summary['alpha_source']}); "
        f"fallback rate: {_fmt(summary['fallback_rate'], '.2%')}",
        "finish reasons: "
        + (", ".join(f"{k} {v}" for k, v in sorted(analysis.finish.items())) or "-"),
        "steps by reason: "
        + (", ".join(f"{k} {v}" for k, v in sorted(analysis.reasons.items())) or "-"),
    ]
    if analysis.errors:
        lines.append(
            "failures: " + ", ".join(f"{k} {v}" for k, v in sorted(analysis.errors.items()))
        )
    if not analysis.with_diagnostics:
        lines.append("no per-token diagnostics (generate --diagnostics): per-token plots empty")
    lines.append(f"report: {out_dir / 'report.html'}")
    return "\n".join(lines) + "\n"


def write_report(
    source: Path, out_dir: Path, *, samples: int = 8, max_positions: int = 512
) -> Analysis:
    records = final_records(source)
    analysis = analyse(records, max_positions=max_positions)
    images = render_plots(analysis)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (out_dir / name).write_bytes(data)
    (out_dir / "summary.json").write_text(json.dumps(analysis.as_dict(), indent=2) + "\n")
    page = render_html(analysis, images, records, source, samples)
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    return analysis


def run(args: argparse.Namespace) -> int:
    source: Path = args.input
    if not source.is_file():
        sys.stderr.write(f"dual-vllm report: {source} is not a file\n")
        return 2
    out_dir: Path = args.out_dir or source.with_name(source.name + ".report")
    try:
        analysis = write_report(
            source, out_dir, samples=args.samples, max_positions=args.max_positions
        )
    except StoreError as exc:
        sys.stderr.write(f"dual-vllm report: {exc}\n")
        return 2
    sys.stdout.write(format_text(analysis, out_dir))
    return 0
