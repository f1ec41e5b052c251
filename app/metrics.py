"""Every Prometheus metric of the gateway, on its own CollectorRegistry (docs/ARCHITECTURE.md).

One prefix (`dual_vllm_`), `_total` on counters, base units (`_seconds`), no colons (Prometheus
keeps those for recording rules, see deploy/prometheus/rules.yml), and only small fixed label
sets: `endpoint`, `outcome`, `upstream`, `kind`, `reason` (and `version` on the constant
`dual_vllm_build_info`). Every label value is drawn from a closed tuple below; anything else is
counted as "other" so a caller's typo can never explode the series count. Every combination
is created at start, so dashboards see zeros, not gaps.

`Metrics` implements `app.coordinator.Observer` (`upstream_call`, `step`) and the HTTP layer's
hooks (`request_started` / `request_finished`, TTFT, inter-token latency). The table of what
each metric means is in docs/OPERATIONS.md.
"""

from __future__ import annotations

import logging
import math
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from app.sampling.types import DRAFT_NAMES, REASONS, StepResult
from app.version import version

logger = logging.getLogger(__name__)

PREFIX: Final = "dual_vllm"

ENDPOINTS: Final = ("completions", "chat_completions")
OUTCOMES: Final = (
    "ok",
    "client_error",
    "upstream_error",
    "internal_error",
    "cancelled",
    "rate_limited",
    "unavailable",  # refused while the gateway was starting or draining (app/lifecycle.py)
)
UPSTREAMS: Final = ("base", "teacher")
DRAFTS: Final = ("accepted", "resampled", "bonus")
# Upstream error kinds follow the error table (app/errors.py): timeout -> 504, unavailable
# (connect error / 503) -> 503, bad_response (other 5xx, malformed body) -> 502, rejected (4xx).
ERROR_KINDS: Final = ("timeout", "unavailable", "bad_response", "rejected", "other")
OTHER: Final = "other"
# Why an upstream call was retried (app/upstream.py `_retry_reason`).
# "spoiled": a top-K answer spoiled by vLLM's logprob_token_ids batch bug (app/probes.py).
RETRY_REASONS: Final = (
    "connect",
    "unavailable",
    "timeout",
    "reset",
    "server_error",
    "spoiled",
    "other",
)

# The coordinator may report the exception class name instead of the kind; both are accepted.
_ERROR_CLASS_KINDS: Final = {
    "UpstreamTimeoutError": "timeout",
    "UpstreamUnavailableError": "unavailable",
    "UpstreamError": "bad_response",
    "UpstreamRejectedError": "rejected",
    "ContextLengthError": "rejected",
}

# Buckets chosen for the data they hold.
# α ∈ [0, 1] (docs/ALGORITHM.md §5): even steps of 0.05; forced/fallback steps land exactly on 1.0.
ALPHA_BUCKETS: Final = tuple(round(i * 0.05, 2) for i in range(21))
# JS ∈ [0, ln 2] (§3): log-spaced near 0 where similar models live, then linear to ln 2.
JS_BUCKETS: Final = (
    0.0001,
    0.0003,
    0.001,
    0.003,
    0.01,
    0.03,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    math.log(2),
)
# Probability masses ∈ [0, 1]: overlap mass is usually near 1, filled mass near 0.
MASS_BUCKETS: Final = (
    0.0001,
    0.001,
    0.01,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.7,
    0.8,
    0.9,
    0.95,
    0.99,
    1.0,
)
# |kl_gap| of solved steps must be ≤ 1e-9 (§5): log-spaced decades around that bound.
KL_GAP_BUCKETS: Final = tuple(10.0**e for e in range(-16, -2))
# Chernoff information C (nats) ≥ 0, ≤ min(KL(p_b‖p_t), KL(p_t‖p_b)); small for close models.
CHERNOFF_BUCKETS: Final = (
    0.0001,
    0.0003,
    0.001,
    0.003,
    0.01,
    0.03,
    0.1,
    0.3,
    1.0,
    3.0,
    10.0,
)
# Latencies: one CPU vLLM step is tens to hundreds of ms; a whole request can take minutes.
UPSTREAM_SECONDS_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
TOKEN_SECONDS_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Waiting for a slot: usually 0 (a free slot), bounded by Settings.queue_timeout (seconds).
QUEUE_SECONDS_BUCKETS: Final = (0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_SECONDS_BUCKETS: Final = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


def _name(suffix: str) -> str:
    return f"{PREFIX}_{suffix}"


def _closed(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value in allowed:
        return value
    logger.warning("metrics: unknown %s %r counted as %r", what, value, OTHER)
    return OTHER


def _error_kind(error: str) -> str:
    kind = _ERROR_CLASS_KINDS.get(error, error)
    return kind if kind in ERROR_KINDS else OTHER


class Metrics:
    """All gateway metrics; one instance per app (built in the lifespan, never a global)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        # CPU/memory/fds of the gateway process, under the same prefix.
        ProcessCollector(namespace=PREFIX, registry=reg)
        # Which release is running (constant 1; join on it with `* on (instance) group_left`).
        build_info = Gauge(
            _name("build_info"),
            "The running dual-vllm version (value 1).",
            ["version"],
            registry=reg,
        )
        build_info.labels(version()).set(1)

        # --- HTTP layer --------------------------------------------------------------------
        self._requests = Counter(
            _name("requests"),
            "Finished client requests by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=reg,
        )
        self._request_seconds = Histogram(
            _name("request_duration_seconds"),
            "Wall time of a client request, from admission to the last byte.",
            ["endpoint"],
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=reg,
        )
        self._in_flight = Gauge(
            _name("requests_in_flight"),
            "Client requests being served right now.",
            ["endpoint"],
            registry=reg,
        )
        self._ttft = Histogram(
            _name("time_to_first_token_seconds"),
            "From request admission to the first generated token.",
            buckets=TOKEN_SECONDS_BUCKETS,
            registry=reg,
        )
        self._itl = Histogram(
            _name("inter_token_latency_seconds"),
            "Time between consecutive tokens of one choice.",
            buckets=TOKEN_SECONDS_BUCKETS,
            registry=reg,
        )

        self._queue_wait = Histogram(
            _name("queue_wait_seconds"),
            "Time a generation request waited for a slot under the concurrency limit (those "
            "that got a 429 included; they are outcome=rate_limited).",
            buckets=QUEUE_SECONDS_BUCKETS,
            registry=reg,
        )

        # --- upstream calls ----------------------------------------------------------------
        self._upstream_seconds = Histogram(
            _name("upstream_request_duration_seconds"),
            "Latency of one HTTP call to an upstream vLLM server (errors included).",
            ["upstream"],
            buckets=UPSTREAM_SECONDS_BUCKETS,
            registry=reg,
        )
        self._upstream_errors = Counter(
            _name("upstream_errors"),
            "Failed upstream calls by upstream and kind.",
            ["upstream", "kind"],
            registry=reg,
        )
        self._upstream_retries = Counter(
            _name("upstream_retries"),
            "Upstream calls retried (probes and other idempotent calls) by upstream and reason.",
            ["upstream", "reason"],
            registry=reg,
        )
        self._replica_ejections = Counter(
            _name("upstream_replica_ejections"),
            "Replicas ejected from an upstream's pool after a failure.",
            ["upstream"],
            registry=reg,
        )

        # --- the mixing (docs/ALGORITHM.md §6) ------------------------------------------------
        self._tokens = Counter(
            _name("generated_tokens"),
            "Tokens generated (one per mixing step).",
            registry=reg,
        )
        self._steps = Counter(
            _name("steps"),
            "Mixing steps by how α was chosen (first_token = forced, unstable = fallback).",
            ["reason"],
            registry=reg,
        )
        self._drafts = Counter(
            _name("speculative_tokens"),
            "Tokens made in speculative rounds (docs/ALGORITHM.md §8): accepted drafts, tokens "
            "drawn from the residual after a rejection, bonus tokens after a fully accepted "
            "round. Acceptance = accepted / (accepted + resampled); tokens per round = all / "
            "(resampled + bonus).",
            ["draft"],
            registry=reg,
        )
        self._refetches = Counter(
            _name("support_refetches"),
            "Fetches of more values (exact logprobs of missing ids, a larger K) made because a "
            "token's uncertain_mass exceeded mixing.max_uncertain_mass (docs/ALGORITHM.md §9).",
            registry=reg,
        )
        self._certified = Counter(
            _name("certified_tokens"),
            "Tokens generated with mixing.max_uncertain_mass, by whether their uncertain_mass "
            "ended within it (false: the upstreams' --max-logprobs could not get there).",
            ["certified"],
            registry=reg,
        )
        self._step_seconds = Histogram(
            _name("step_duration_seconds"),
            "Wall time of one mixing step: both upstream calls and the math.",
            buckets=UPSTREAM_SECONDS_BUCKETS,
            registry=reg,
        )
        self._alpha = Histogram(
            _name("alpha"),
            "Mixing weight α of q ∝ p_b^(1-α) p_t^α (steps with a single token excluded).",
            buckets=ALPHA_BUCKETS,
            registry=reg,
        )
        self._js = Histogram(
            _name("js_divergence"),
            "Jensen-Shannon divergence of base and teacher per step (nats, ≤ ln 2).",
            buckets=JS_BUCKETS,
            registry=reg,
        )
        self._overlap = Histogram(
            _name("overlap_mass"),
            "Probability mass on tokens in both top-K lists (the smaller of the two).",
            buckets=MASS_BUCKETS,
            registry=reg,
        )
        self._kl_gap = Histogram(
            _name("kl_gap"),
            "|KL(q‖p_b) − KL(q‖p_t)| at the solved α (solved steps only; target ≤ 1e-9).",
            buckets=KL_GAP_BUCKETS,
            registry=reg,
        )
        self._chernoff = Histogram(
            _name("chernoff_information"),
            "Chernoff information of base and teacher per step (nats).",
            buckets=CHERNOFF_BUCKETS,
            registry=reg,
        )
        self._filled = Histogram(
            _name("filled_mass"),
            "Mass of q on token ids whose probability for a model was filled in (not in top-K).",
            buckets=MASS_BUCKETS,
            registry=reg,
        )
        self._uncertain = Histogram(
            _name("uncertain_mass"),
            "Bound on q's mass outside the known support (docs/ALGORITHM.md §9; once it exists).",
            buckets=MASS_BUCKETS,
            registry=reg,
        )

        # Every label combination exists from the start (zeros, not missing series).
        for endpoint in (*ENDPOINTS, OTHER):
            self._request_seconds.labels(endpoint)
            self._in_flight.labels(endpoint)
            for outcome in (*OUTCOMES, OTHER):
                self._requests.labels(endpoint, outcome)
        for upstream in (*UPSTREAMS, OTHER):
            self._upstream_seconds.labels(upstream)
            self._replica_ejections.labels(upstream)
            for kind in ERROR_KINDS:
                self._upstream_errors.labels(upstream, kind)
            for reason in RETRY_REASONS:
                self._upstream_retries.labels(upstream, reason)
        for reason in REASONS:
            self._steps.labels(reason)
        for draft in DRAFTS:
            self._drafts.labels(draft)
        for certified in ("true", "false"):
            self._certified.labels(certified)

    # --- Observer (called by the coordinator) -------------------------------------------------

    def upstream_call(self, upstream: str, seconds: float, error: str | None) -> None:
        """One HTTP call to an upstream finished (`error` is a kind of ERROR_KINDS or the
        app.errors class name; None on success)."""
        label = _closed(upstream, UPSTREAMS, "upstream")
        self._upstream_seconds.labels(label).observe(max(seconds, 0.0))
        if error is not None:
            self._upstream_errors.labels(label, _error_kind(error)).inc()

    def upstream_retry(self, upstream: str, reason: str) -> None:
        """A failed upstream call is being retried (`reason`: one of RETRY_REASONS)."""
        self._upstream_retries.labels(
            _closed(upstream, UPSTREAMS, "upstream"), _closed(reason, RETRY_REASONS, "reason")
        ).inc()

    def replica_ejected(self, upstream: str) -> None:
        """A replica of `upstream` left its pool (it comes back when /health answers)."""
        self._replica_ejections.labels(_closed(upstream, UPSTREAMS, "upstream")).inc()

    def step(self, result: StepResult, seconds: float) -> None:
        """One generated token."""
        self._tokens.inc()
        self._steps.labels(_closed(result.reason, REASONS, "reason")).inc()
        self._step_seconds.observe(max(seconds, 0.0))
        if result.draft:
            self._drafts.labels(_closed(DRAFT_NAMES[result.draft] or "", DRAFTS, "draft")).inc()
        _observe(self._alpha, result.alpha)
        _observe(self._js, result.js)
        _observe(self._overlap, result.overlap_mass)
        if result.reason == "solved":
            # Other reasons set α by rule; their gap is not a solver error (docs/ALGORITHM.md §5).
            _observe(self._kl_gap, abs(result.kl_gap))
        if result.reason != "single_token":
            _observe(self._chernoff, result.chernoff)
        _observe(self._filled, result.filled_mass)
        _observe(self._uncertain, result.uncertain_mass)
        if result.refetches:
            self._refetches.inc(result.refetches)
        if result.certified is not None:
            self._certified.labels("true" if result.certified else "false").inc()

    # --- HTTP layer (called by routes / middleware) ----------------------------------------

    def request_started(self, endpoint: str) -> None:
        """A request was admitted; pair it with exactly one request_finished."""
        self._in_flight.labels(_closed(endpoint, ENDPOINTS, "endpoint")).inc()

    def request_finished(self, endpoint: str, outcome: str, seconds: float) -> None:
        label = _closed(endpoint, ENDPOINTS, "endpoint")
        self._in_flight.labels(label).dec()
        self._requests.labels(label, _closed(outcome, OUTCOMES, "outcome")).inc()
        self._request_seconds.labels(label).observe(max(seconds, 0.0))

    def queue_wait(self, seconds: float, admitted: bool) -> None:
        """A generation request's wait for a slot (0 when one was free)."""
        self._queue_wait.observe(max(seconds, 0.0))

    def time_to_first_token(self, seconds: float) -> None:
        self._ttft.observe(max(seconds, 0.0))

    def inter_token_latency(self, seconds: float) -> None:
        self._itl.observe(max(seconds, 0.0))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _observe(histogram: Histogram, value: float | None) -> None:
    # A NaN would poison _sum forever and land in +Inf; the math should never produce one.
    if value is not None and math.isfinite(value):
        histogram.observe(value)
