"""A real Prometheus (Debian's package; `make system-deps`) scrapes a real gateway.

The gateway (create_app on a real uvicorn) talks to the fake vLLM pair over real HTTP; a few
requests go through it (plain, streamed, chat, a client error, an upstream failure), Prometheus
scrapes it every second with deploy/prometheus/rules.yml and alerts.yml loaded, and then every
recording rule and every dashboard panel expression on the gateway's series is evaluated
through Prometheus' HTTP API: each must evaluate without error and return data; every alert
must evaluate without error. promtool checks the shipped config and rules too.

The dashboard's upstream vLLM row queries the vLLM servers' own `vllm:*` metrics, which the
fakes do not export: `test_vllm_dashboard_expressions_with_real_vllm` (marker `real_vllm`)
scrapes the two real CPU vLLM servers with the shipped `vllm` scrape job and evaluates those.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.main import create_app
from app.settings import Settings
from tests.fakes import FakeVLLM, serve, serve_pair
from tests.real_vllm import RealVLLM

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dual-vllm.json"

# Grafana's variables, made concrete: a range window covering several 1 s scrapes.
GRAFANA_VARIABLES = {
    "$__rate_interval": "30s",
    "$__interval": "5s",
    "$__range": "5m",
    '"$instance"': '".*"',
    '"$vllm_instance"': '".*"',
}

pytestmark = pytest.mark.timeout(240)


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (Debian's prometheus)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Stack:
    gateway: str
    prometheus: str
    base: FakeVLLM
    teacher: FakeVLLM


def gateway_job(gateway: str) -> dict[str, Any]:
    return {
        "job_name": "dual-vllm",
        "metrics_path": "/metrics",
        "static_configs": [{"targets": [gateway.removeprefix("http://")]}],
    }


@contextlib.contextmanager
def run_prometheus(
    tmp_path: Path, gateway: str, extra_jobs: tuple[dict[str, Any], ...] = ()
) -> Iterator[str]:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES), str(ALERTS)],
        "scrape_configs": [gateway_job(gateway), *extra_jobs],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    check = subprocess.run(
        [binary("promtool"), "check", "config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    "prometheus exited: " + (tmp_path / "prometheus.log").read_text()[-2000:]
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def query(prometheus: str, expr: str) -> dict[str, Any]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body: dict[str, Any] = response.json()
    assert response.status_code == 200, (expr, body)
    assert body["status"] == "success", (expr, body)
    data: dict[str, Any] = body["data"]
    return data


def values(prometheus: str, expr: str) -> list[float]:
    data = query(prometheus, expr)
    assert data["resultType"] == "vector", (expr, data)
    return [float(item["value"][1]) for item in data["result"]]


def wait_for(prometheus: str, expr: str, timeout: float = 30.0) -> list[float]:
    deadline = time.monotonic() + timeout
    while True:
        found = values(prometheus, expr)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no data for {expr} within {timeout}s")
        time.sleep(0.5)


def drive(gateway: str, teacher: FakeVLLM) -> None:
    """Traffic that touches every metric family: completions (plain + streamed), chat, a
    client error and an upstream failure."""
    with httpx.Client(base_url=gateway, timeout=60) as client:
        for seed in range(3):
            response = client.post(
                "/v1/completions",
                json={
                    "model": "dual-vllm",
                    "prompt": "Question: name a colour.\nAnswer:",
                    "max_tokens": 8,
                    "seed": seed,
                    "mixing": {"diagnostics": True},
                },
            )
            assert response.status_code == 200, response.text
        with client.stream(
            "POST",
            "/v1/completions",
            json={"model": "dual-vllm", "prompt": "Hello", "max_tokens": 8, "stream": True},
        ) as stream:
            assert stream.status_code == 200
            frames = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert frames[-1] == "data: [DONE]"
        chat = client.post(
            "/v1/chat/completions",
            json={
                "model": "dual-vllm",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 6,
            },
        )
        assert chat.status_code == 200, chat.text
        bad = client.post("/v1/completions", json={"model": "dual-vllm", "prompt": 5})
        assert bad.status_code == 400
        # The teacher fails every completion call for a moment: a 502 and upstream errors.
        teacher.faults.status = 500
        try:
            failed = client.post(
                "/v1/completions",
                json={"model": "dual-vllm", "prompt": "Hello", "max_tokens": 4},
            )
        finally:
            teacher.faults.status = None
        assert failed.status_code >= 500, failed.text


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp_path = tmp_path_factory.mktemp("prometheus")
    with serve_pair() as (base_url, teacher_url, base, teacher):
        settings = Settings(base_url=[base_url], teacher_url=[teacher_url], upstream_retries=0)
        with (
            serve(create_app(settings), timeout=30, lifespan="on") as gateway,
            run_prometheus(tmp_path, gateway) as prom,
        ):
            # One scrape before the traffic, so counters have a starting point to rate from.
            assert wait_for(prom, 'up{job="dual-vllm"} == 1') == [1.0]
            drive(gateway, teacher)
            served = httpx.get(f"{gateway}/metrics", timeout=10).text
            total = re.search(r"^dual_vllm_generated_tokens_total (\S+)$", served, re.M)
            assert total is not None
            tokens = float(total.group(1))
            assert tokens > 0
            # Until Prometheus has scraped everything the traffic produced, then two more.
            wait_for(prom, f"dual_vllm_generated_tokens_total >= {tokens}")
            time.sleep(2.5)
            yield Stack(gateway=gateway, prometheus=prom, base=base, teacher=teacher)


def rule_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_exprs(*, vllm: bool) -> list[tuple[str, str]]:
    """(panel title, expression) of every target; `vllm`: those on the vLLM servers' own
    `vllm:*` series (the upstream row), else those on the gateway's series only."""
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, concrete in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, concrete)
            assert "$" not in expr, f"unreplaced variable in {expr}"
            if ("vllm:" in expr) == vllm:
                out.append((panel["title"], expr))
    return out


def alert_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"]}


# --- promtool on the shipped files -----------------------------------------------------------


def test_promtool_accepts_the_shipped_config_and_rules() -> None:
    for args in (
        ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(RULES)],
        ["check", "rules", str(ALERTS)],
    ):
        result = subprocess.run(
            [binary("promtool"), *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "rules.yml"
    broken.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "x", "rules": [{"record": "a:b:c", "expr": "sum(rate(x[5m])"}]}]}
        )
    )
    result = subprocess.run(
        [binary("promtool"), "check", "rules", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0


# --- Prometheus scraping the gateway -------------------------------------------------------------


def test_every_recording_rule_evaluates_with_data(stack: Stack) -> None:
    rules = rule_exprs()
    assert rules
    for record, expr in rules.items():
        assert values(stack.prometheus, expr), f"{record}: no data"
    # Prometheus loaded the same files and evaluates them (alerts too) without errors.
    body = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()
    loaded = [rule for group in body["data"]["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in loaded if rule["type"] == "recording"} == set(rules)
    assert {rule["name"] for rule in loaded if rule["type"] == "alerting"} == alert_names()
    assert all(rule["health"] == "ok" for rule in loaded), [
        (rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"
    ]
    # And the recorded series exist (evaluation_interval is 1 s).
    for record in rules:
        wait_for(stack.prometheus, record, timeout=15)


def test_every_dashboard_expression_evaluates_with_data(stack: Stack) -> None:
    exprs = dashboard_exprs(vllm=False)
    assert len(exprs) >= 20
    for title, expr in exprs:
        assert values(stack.prometheus, expr), f"panel {title!r}: no data for {expr}"


def test_the_numbers_reflect_the_traffic(stack: Stack) -> None:
    prom = stack.prometheus

    def one(expr: str) -> float:
        found = values(prom, expr)
        assert len(found) == 1, (expr, found)
        return found[0]

    assert one("sum(rate(dual_vllm_generated_tokens_total[30s]))") > 0
    ok = one('sum(dual_vllm_requests_total{endpoint="completions", outcome="ok"})')
    assert ok >= 4  # three plain + one streamed
    assert one('sum(dual_vllm_requests_total{endpoint="chat_completions", outcome="ok"})') >= 1
    assert one('sum(dual_vllm_requests_total{outcome="client_error"})') >= 1
    assert one('sum(dual_vllm_requests_total{outcome="upstream_error"})') >= 1
    assert one('sum(dual_vllm_upstream_errors_total{upstream="teacher"})') >= 1
    assert one("sum(dual_vllm_requests_in_flight)") == 0
    alpha_mean = one("dual_vllm:alpha:mean5m")
    assert 0.0 <= alpha_mean <= 1.0
    # Forced first tokens: one per successful choice at least.
    assert one('sum(dual_vllm_steps_total{reason="first_token"})') >= 5
    ttft_buckets = "rate(dual_vllm_time_to_first_token_seconds_bucket[30s])"
    ttft = one(f"histogram_quantile(0.5, sum by (le) ({ttft_buckets}))")
    assert math.isfinite(ttft)
    assert 0 < ttft < 10
    js_count = one("sum(dual_vllm_js_divergence_count)")
    assert js_count == one("sum(dual_vllm_generated_tokens_total)")


def test_a_missing_metric_would_be_caught(stack: Stack) -> None:
    """The checks above can fail: a query for a series the gateway does not export is empty."""
    assert values(stack.prometheus, "sum by (le) (rate(dual_vllm_alpha_total[30s]))") == []


# --- the upstream vLLM row, against the two real CPU vLLM servers --------------------------------


def shipped_vllm_job(base_url: str, teacher_url: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml's `vllm` job (labels and all), aimed at these servers."""
    shipped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in shipped["scrape_configs"] if j["job_name"] == "vllm"]
    urls = {"base": base_url, "teacher": teacher_url}
    for static in job["static_configs"]:
        static["targets"] = [urls[static["labels"]["upstream"]].removeprefix("http://")]
    assert {s["labels"]["upstream"] for s in job["static_configs"]} == set(urls)
    return dict(job)


@pytest.mark.real_vllm
def test_vllm_dashboard_expressions_with_real_vllm(
    real_vllm: RealVLLM, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every panel of the upstream vLLM row returns data when Prometheus scrapes real vLLM
    servers with the shipped scrape job and a gateway sends them real traffic."""
    exprs = dashboard_exprs(vllm=True)
    assert len(exprs) >= 8
    tmp_path = tmp_path_factory.mktemp("prometheus-vllm")
    settings = Settings(base_url=[real_vllm.base_url], teacher_url=[real_vllm.teacher_url])
    vllm_job = shipped_vllm_job(real_vllm.base_url, real_vllm.teacher_url)
    with (
        serve(create_app(settings), timeout=120, lifespan="on") as gateway,
        run_prometheus(tmp_path, gateway, (vllm_job,)) as prom,
    ):
        # Both servers scraped and up (the two targets' first scrapes land at different times).
        assert wait_for(prom, 'count(up{job="vllm"} == 1) == 2', timeout=30) == [2.0]
        with httpx.Client(base_url=gateway, timeout=120) as client:
            # Traffic for the vLLM row: two answered requests (this test is about the panels;
            # a request the busy shared pair fails once is retried, and reported if it keeps
            # failing).
            answered, failures = 0, []
            for seed in range(6):
                response = client.post(
                    "/v1/completions",
                    json={"prompt": "The capital of France is", "max_tokens": 4, "seed": seed},
                )
                if response.status_code == 200:
                    answered += 1
                else:
                    failures.append(f"{response.status_code}: {response.text[:300]}")
                if answered == 2:
                    break
            assert answered == 2, failures
        served = httpx.get(f"{real_vllm.teacher_url}/metrics", timeout=10).text
        total = re.search(r"^vllm:prompt_tokens_total\{[^}]*\} (\S+)$", served, re.M)
        assert total is not None, "vLLM exports no vllm:prompt_tokens_total"
        wait_for(prom, f'vllm:prompt_tokens_total{{upstream="teacher"}} >= {total.group(1)}')
        time.sleep(2.5)
        for title, expr in exprs:
            found = values(prom, expr)
            assert found, f"panel {title!r}: no data for {expr}"
        # One series per upstream (the `upstream` label of the shipped job), e.g. the queues.
        running = query(prom, "sum by (upstream) (vllm:num_requests_running)")["result"]
        assert {item["metric"]["upstream"] for item in running} == {"base", "teacher"}
