"""app.metrics: names follow the conventions, observations land where they should."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import ENDPOINTS, ERROR_KINDS, OUTCOMES, UPSTREAMS, Metrics
from app.sampling.types import REASONS, Reason, StepResult
from app.version import version

ALLOWED_LABELS = {"endpoint", "outcome", "upstream", "kind", "reason", "le", "draft", "certified"}


def make_step(
    reason: Reason = "solved",
    alpha: float | None = 0.3,
    *,
    js: float = 0.02,
    overlap_mass: float = 0.9,
    kl_gap: float = 1e-11,
    chernoff: float = 0.004,
    filled_mass: float = 0.001,
) -> StepResult:
    return StepResult(
        token_id=7,
        logprob=-0.5,
        alpha=alpha,
        reason=reason,
        js=js,
        overlap_count=15,
        overlap_mass=overlap_mass,
        kl_gap=kl_gap,
        chernoff=chernoff,
        support_size=25,
        filled_mass=filled_mass,
        support=np.array([7], dtype=np.int64),
        logq=np.array([-0.5]),
    )


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, _ = metrics.render()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, frozenset(labels.items()))]


def test_names_follow_conventions() -> None:
    body, content_type = Metrics().render()
    assert content_type.startswith("text/plain")
    families = list(text_string_to_metric_families(body.decode()))
    names = {f.name for f in families}
    # The list, one family each.
    for required in (
        "dual_vllm_requests",
        "dual_vllm_generated_tokens",
        "dual_vllm_alpha",
        "dual_vllm_steps",
        "dual_vllm_js_divergence",
        "dual_vllm_overlap_mass",
        "dual_vllm_kl_gap",
        "dual_vllm_chernoff_information",
        "dual_vllm_filled_mass",
        "dual_vllm_uncertain_mass",
        "dual_vllm_upstream_request_duration_seconds",
        "dual_vllm_upstream_errors",
        "dual_vllm_time_to_first_token_seconds",
        "dual_vllm_inter_token_latency_seconds",
        "dual_vllm_requests_in_flight",
        "dual_vllm_step_duration_seconds",
        "dual_vllm_build_info",
    ):
        assert required in names
    for family in families:
        assert family.name.startswith("dual_vllm_"), family.name
        assert ":" not in family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "histogram" and "alpha" not in family.name:
            # Times are in seconds; everything else is dimensionless or nats.
            assert not re.search(r"_(ms|milliseconds|minutes)$", family.name)
        allowed = ALLOWED_LABELS
        if family.name == "dual_vllm_build_info":
            allowed = allowed | {"version"}  # constant 1; one series per process
        for s in family.samples:
            assert set(s.labels) <= allowed, (s.name, s.labels)


def test_build_info_names_the_running_version() -> None:
    got = {(name, labels): v for (name, labels), v in samples(Metrics()).items() if "build" in name}
    assert got == {("dual_vllm_build_info", frozenset({("version", version())})): 1.0}


def test_every_label_combination_exists_at_start() -> None:
    got = samples(Metrics())
    for endpoint in ENDPOINTS:
        assert got[("dual_vllm_requests_in_flight", frozenset({("endpoint", endpoint)}))] == 0
        for outcome in OUTCOMES:
            key = frozenset({("endpoint", endpoint), ("outcome", outcome)})
            assert got[("dual_vllm_requests_total", key)] == 0
    for upstream in UPSTREAMS:
        for kind in ERROR_KINDS:
            key = frozenset({("upstream", upstream), ("kind", kind)})
            assert got[("dual_vllm_upstream_errors_total", key)] == 0
    for reason in REASONS:
        assert got[("dual_vllm_steps_total", frozenset({("reason", reason)}))] == 0


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.step(make_step(), 0.01)
    assert value(a, "dual_vllm_generated_tokens_total") == 1
    assert value(b, "dual_vllm_generated_tokens_total") == 0


def test_request_lifecycle_counts_and_in_flight() -> None:
    m = Metrics()
    m.request_started("completions")
    m.request_started("completions")
    m.request_started("chat_completions")
    assert value(m, "dual_vllm_requests_in_flight", endpoint="completions") == 2
    m.request_finished("completions", "ok", 0.2)
    m.request_finished("completions", "upstream_error", 3.0)
    m.request_finished("chat_completions", "cancelled", 0.05)
    assert value(m, "dual_vllm_requests_in_flight", endpoint="completions") == 0
    assert value(m, "dual_vllm_requests_in_flight", endpoint="chat_completions") == 0
    assert value(m, "dual_vllm_requests_total", endpoint="completions", outcome="ok") == 1
    assert (
        value(m, "dual_vllm_requests_total", endpoint="completions", outcome="upstream_error") == 1
    )
    assert (
        value(m, "dual_vllm_requests_total", endpoint="chat_completions", outcome="cancelled") == 1
    )
    assert value(m, "dual_vllm_request_duration_seconds_count", endpoint="completions") == 2
    assert value(
        m, "dual_vllm_request_duration_seconds_sum", endpoint="completions"
    ) == pytest.approx(3.2)
    assert (
        value(m, "dual_vllm_request_duration_seconds_bucket", endpoint="completions", le="0.25")
        == 1
    )


def test_unknown_label_values_are_bounded() -> None:
    m = Metrics()
    m.request_started("/v1/completions?user=42")
    m.request_finished("/v1/completions?user=42", "weird", 0.1)
    m.upstream_call("http://10.0.0.1:9000", 0.1, "socket exploded")
    assert value(m, "dual_vllm_requests_total", endpoint="other", outcome="other") == 1
    assert value(m, "dual_vllm_upstream_errors_total", upstream="other", kind="other") == 1
    names = {name for name, _ in samples(m)}
    labels = {v for _, ls in samples(m) for _, v in ls}
    assert not any("10.0.0.1" in x or "user=42" in x for x in labels | names)


def test_upstream_retries_and_ejections() -> None:
    m = Metrics()
    assert value(m, "dual_vllm_upstream_retries_total", upstream="base", reason="reset") == 0
    m.upstream_retry("base", "reset")
    m.upstream_retry("teacher", "server_error")
    m.upstream_retry("teacher", "made up")
    m.replica_ejected("teacher")
    assert value(m, "dual_vllm_upstream_retries_total", upstream="base", reason="reset") == 1
    assert (
        value(m, "dual_vllm_upstream_retries_total", upstream="teacher", reason="server_error") == 1
    )
    assert value(m, "dual_vllm_upstream_retries_total", upstream="teacher", reason="other") == 1
    assert value(m, "dual_vllm_upstream_replica_ejections_total", upstream="teacher") == 1


def test_upstream_calls_and_error_kinds() -> None:
    m = Metrics()
    m.upstream_call("base", 0.004, None)
    m.upstream_call("teacher", 0.02, "timeout")
    m.upstream_call("teacher", 0.5, "UpstreamUnavailableError")
    m.upstream_call("base", 0.01, "UpstreamError")
    assert value(m, "dual_vllm_upstream_request_duration_seconds_count", upstream="base") == 2
    assert value(m, "dual_vllm_upstream_request_duration_seconds_count", upstream="teacher") == 2
    assert (
        value(m, "dual_vllm_upstream_request_duration_seconds_bucket", upstream="base", le="0.005")
        == 1
    )
    errors = {
        (dict(ls)["upstream"], dict(ls)["kind"]): v
        for (name, ls), v in samples(m).items()
        if name == "dual_vllm_upstream_errors_total" and v
    }
    assert errors == {
        ("teacher", "timeout"): 1,
        ("teacher", "unavailable"): 1,
        ("base", "bad_response"): 1,
    }


def test_step_observations() -> None:
    m = Metrics()
    m.step(make_step("first_token", 1.0, kl_gap=0.7), 0.05)
    m.step(make_step("solved", 0.32, kl_gap=-3e-11), 0.04)
    m.step(make_step("solved", 0.71, kl_gap=2e-10), 0.03)
    m.step(make_step("unstable", 1.0, js=0.6, overlap_mass=0.05, kl_gap=0.9), 0.06)
    m.step(make_step("single_token", None, chernoff=0.0, js=0.0), 0.02)
    assert value(m, "dual_vllm_generated_tokens_total") == 5
    assert value(m, "dual_vllm_steps_total", reason="solved") == 2
    assert value(m, "dual_vllm_steps_total", reason="first_token") == 1
    assert value(m, "dual_vllm_steps_total", reason="unstable") == 1
    assert value(m, "dual_vllm_steps_total", reason="single_token") == 1
    # α: single-token steps have none; cumulative buckets put 0.32 ≤ 0.35 and 1.0 in le=1.0.
    assert value(m, "dual_vllm_alpha_count") == 4
    assert value(m, "dual_vllm_alpha_bucket", le="0.3") == 0
    assert value(m, "dual_vllm_alpha_bucket", le="0.35") == 1
    assert value(m, "dual_vllm_alpha_bucket", le="0.75") == 2
    assert value(m, "dual_vllm_alpha_bucket", le="0.95") == 2
    assert value(m, "dual_vllm_alpha_bucket", le="1.0") == 4
    assert value(m, "dual_vllm_alpha_sum") == pytest.approx(3.03)
    # kl_gap: solved steps only, as |gap|, both below 1e-9.
    assert value(m, "dual_vllm_kl_gap_count") == 2
    assert value(m, "dual_vllm_kl_gap_bucket", le="1e-09") == 2
    assert value(m, "dual_vllm_kl_gap_bucket", le="1e-10") == 1
    # JS and overlap every step; the unstable one lands in the top buckets.
    assert value(m, "dual_vllm_js_divergence_count") == 5
    assert value(m, "dual_vllm_js_divergence_bucket", le="0.5") == 4
    assert value(m, "dual_vllm_js_divergence_bucket", le=repr(math.log(2))) == 5
    assert value(m, "dual_vllm_overlap_mass_bucket", le="0.1") == 1
    assert value(m, "dual_vllm_chernoff_information_count") == 4
    assert value(m, "dual_vllm_filled_mass_count") == 5
    assert value(m, "dual_vllm_uncertain_mass_count") == 0  # StepResult has no field yet
    assert value(m, "dual_vllm_step_duration_seconds_count") == 5
    assert value(m, "dual_vllm_step_duration_seconds_sum") == pytest.approx(0.2)


def test_non_finite_values_do_not_poison_histograms() -> None:
    m = Metrics()
    m.step(make_step("solved", 0.5, js=math.nan, chernoff=math.inf), 0.01)
    assert value(m, "dual_vllm_js_divergence_count") == 0
    assert value(m, "dual_vllm_chernoff_information_count") == 0
    assert value(m, "dual_vllm_js_divergence_sum") == 0
    assert value(m, "dual_vllm_alpha_count") == 1


def test_token_latencies() -> None:
    m = Metrics()
    m.time_to_first_token(0.3)
    for seconds in (0.02, 0.04, 0.2):
        m.inter_token_latency(seconds)
    assert value(m, "dual_vllm_time_to_first_token_seconds_count") == 1
    assert value(m, "dual_vllm_time_to_first_token_seconds_bucket", le="0.25") == 0
    assert value(m, "dual_vllm_time_to_first_token_seconds_bucket", le="0.5") == 1
    assert value(m, "dual_vllm_inter_token_latency_seconds_bucket", le="0.05") == 2
    assert value(m, "dual_vllm_inter_token_latency_seconds_count") == 3


def test_speculative_and_certified_counters() -> None:
    m = Metrics()
    for code in (1, 1, 2, 3, 0):
        m.step(make_step()._replace(draft=code), 0.01)
    assert value(m, "dual_vllm_speculative_tokens_total", draft="accepted") == 2
    assert value(m, "dual_vllm_speculative_tokens_total", draft="resampled") == 1
    assert value(m, "dual_vllm_speculative_tokens_total", draft="bonus") == 1
    m.step(make_step()._replace(uncertain_mass=0.01, certified=True, refetches=2), 0.01)
    m.step(make_step()._replace(uncertain_mass=0.3, certified=False, refetches=3), 0.01)
    assert value(m, "dual_vllm_support_refetches_total") == 5
    assert value(m, "dual_vllm_certified_tokens_total", certified="true") == 1
    assert value(m, "dual_vllm_certified_tokens_total", certified="false") == 1
    assert value(m, "dual_vllm_uncertain_mass_count") == 2
