"""deploy/prometheus/alerts.yml: promtool checks it and unit-tests every alert, and each alert
has a runbook in docs/OPERATIONS.md.

Needs Debian's promtool (`make system-deps`, which `make test` runs), like
tests/test_prometheus_real.py; no Prometheus server is started here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
RULES = PROMETHEUS / "rules.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "dual-vllm.json"
PROMETHEUSRULE = ROOT / "deploy" / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"

# Grafana's variables made concrete, so promtool can parse the panel expressions.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$vllm_instance": ".*",
    "$instance": ".*",
}

Doc = dict[str, Any]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run `make system-deps` (Debian's prometheus)")
    return subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=300, check=False, cwd=ROOT
    )


def alerts() -> list[Doc]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_promtool_accepts_the_alerts() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_every_alert_passes_its_unit_tests() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a case where it fires and one where it must not."""
    spec = yaml.safe_load(ALERTS_TEST.read_text())
    assert spec["rule_files"] == [ALERTS.name]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in spec["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert fired == names, names ^ fired
    assert quiet == names, names ^ quiet


def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    """promtool really compares: an expected alert that does not fire fails the run."""
    spec = yaml.safe_load(ALERTS_TEST.read_text())
    spec["rule_files"] = [str(ALERTS)]
    case = next(c for c in spec["tests"] if "RetryStorm" in json.dumps(c))
    for check in case["alert_rule_test"]:
        check["exp_alerts"] = [] if check["exp_alerts"] else [{"exp_labels": {"severity": "x"}}]
    spec["tests"] = [case]
    broken = tmp_path / "alerts_test.yml"
    broken.write_text(yaml.safe_dump(spec))
    assert promtool("test", "rules", str(broken)).returncode != 0


def test_every_alert_has_a_runbook() -> None:
    headings = {
        github_anchor(line.lstrip("#"))
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("### ")
    }
    for rule in alerts():
        name = rule["alert"]
        assert re.fullmatch(r"DualVLLM[A-Za-z]+", name), name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/OPERATIONS.md", name
        assert anchor == name.lower(), name
        assert anchor in headings, f"{name}: no `### {name}` runbook in docs/OPERATIONS.md"
        assert rule.get("for"), f"{name}: fires on one bad evaluation"


def test_the_runbooks_say_what_to_look_at_and_what_to_do() -> None:
    text = OPERATIONS.read_text()
    for rule in alerts():
        name = rule["alert"]
        section = text.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        for part in ("**Means**", "**Look at**", "**Do**"):
            assert part in section, f"{name}: runbook lacks {part}"


def test_the_prometheusrule_groups_pass_promtool(tmp_path: Path) -> None:
    """The Kubernetes PrometheusRule's groups are a valid rule file too."""
    (doc,) = [d for d in yaml.safe_load_all(PROMETHEUSRULE.read_text()) if d]
    extracted = tmp_path / "prometheusrule-groups.yml"
    extracted.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    result = promtool("check", "rules", str(extracted))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    """Every panel query (the upstream vLLM ones included) is valid PromQL: promtool parses
    them as recording rules. tests/test_prometheus_real.py evaluates them on live data."""
    doc = json.loads(DASHBOARD.read_text())
    rules = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, concrete in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, concrete)
            assert "$" not in expr, expr
            rules.append({"record": f"panel:p{panel['id']}_{target['refId']}:expr", "expr": expr})
    assert len(rules) >= 25
    parsed = tmp_path / "dashboard-rules.yml"
    parsed.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(parsed))
    assert result.returncode == 0, result.stdout + result.stderr
    # And the check can fail: an unbalanced parenthesis is rejected.
    rules[0]["expr"] += ")"
    parsed.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert promtool("check", "rules", str(parsed)).returncode != 0
