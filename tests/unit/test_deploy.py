"""The deployment files under deploy/ parse, agree with each other and with the code.

Every YAML document is loaded; Kubernetes kinds, probes, ports, resources and security
settings are checked against the config the manifests carry; every metric name used by the
alerting rules and the dashboard must exist in `detector.metrics.Metrics` (this catches a
renamed metric). The real tools run where they are installed and are skipped, with the
reason, where not: `promtool` and `amtool` (`make deploy-tools` unpacks Debian's packages into
.venv/tools), `docker compose` / `docker-compose`, `kubectl kustomize`, `systemd-analyze`.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from detector.config import Config, KafkaInput, load_config, parse_config
from detector.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
RULES = DEPLOY / "prometheus" / "rules" / "detector.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rules" / "detector.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "detector-dashboard.json"
COMPOSE = DEPLOY / "docker-compose.yml"
UNIT = DEPLOY / "systemd" / "detector.service"
DOCKERFILE = DEPLOY / "Dockerfile"
# Where `make deploy-tools` unpacks promtool and amtool.
LOCAL_TOOLS = ROOT / ".venv" / "tools" / "root" / "usr" / "bin"

METRIC_PATTERN = re.compile(r"\bdetector_[a-z0-9_]+\b")
# Series Prometheus makes itself (the rule tests feed them too).
PROMETHEUS_OWN = {"up"}


# --- helpers ---------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> dict[str, dict[str, Any]]:
    """The base's objects by kind (one of each)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_all(K8S / name):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects in the base"
            objects[doc["kind"]] = doc
    return objects


def metric_sample_names() -> set[str]:
    """Every sample name the daemon's registry can expose (counters' _total, histograms' _bucket...)."""
    registry = CollectorRegistry()
    Metrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum", "_created")}
        else:
            names.add(family.name)
    return names


def rule_exprs() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], rule["expr"]


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            yield f"variable {var['name']}", var["query"]["query"]
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']}", annotation["expr"]


def tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    local = LOCAL_TOOLS / name
    return str(local) if local.is_file() and os.access(local, os.X_OK) else None


def need(name: str) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed (`make deploy-tools` unpacks promtool and amtool into .venv/tools)")
    return path


def run_tool(args: list[str], cwd: Path = DEPLOY, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def configmap_config(objects: dict[str, dict[str, Any]]) -> Config:
    """The ConfigMap's config.yaml, validated with the variables the Deployment sets."""
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: "x" if "valueFrom" in e else e["value"] for e in container["env"]}
    text = objects["ConfigMap"]["data"]["config.yaml"]
    missing = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text) if m.group(1) not in env}
    assert not missing, f"the config needs {sorted(missing)}, which the Deployment does not set"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return parse_config(text, "configmap.yaml")[0]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- every file ------------------------------------------------------------------------------


def test_deploy_has_the_expected_files() -> None:
    for name in [
        "Dockerfile",
        "docker-compose.yml",
        "config/detector.yaml",
        "prometheus/prometheus.yml",
        "prometheus/rules/detector.rules.yml",
        "prometheus/rules/detector.rules.test.yml",
        "alertmanager/alertmanager.yml",
        "grafana/detector-dashboard.json",
        "kubernetes/kustomization.yaml",
        "kubernetes/optional/keda-scaledobject.yaml",
        "systemd/detector.service",
        "systemd/detector.env",
    ]:
        assert (DEPLOY / name).is_file(), name


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_document_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs)


def test_dashboard_is_json_with_unique_panel_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "detector"


# --- metric names: rules, rule tests and dashboard against the registry ----------------------


def test_registry_names_look_like_the_readme() -> None:
    names = metric_sample_names()
    assert "detector_records_consumed_total" in names
    assert "detector_score_bucket" in names
    assert "detector_ready" in names


def test_alerting_rules_use_only_existing_metrics() -> None:
    known = metric_sample_names()
    used = {(alert, name) for alert, expr in rule_exprs() for name in METRIC_PATTERN.findall(expr)}
    assert used, "no detector_ metric in the rules"
    unknown = sorted((alert, name) for alert, name in used if name not in known)
    assert not unknown, f"rules use metrics detector/metrics.py does not define: {unknown}"


def test_rule_unit_tests_feed_existing_metrics() -> None:
    known = metric_sample_names() | PROMETHEUS_OWN
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    series = {s["series"].split("{", 1)[0] for t in tests for s in t["input_series"]}
    assert series - known == set()


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = {name for name, _ in rule_exprs()}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert alerts - fired == set(), "alerts no test expects to fire"
    assert alerts - quiet == set(), "alerts no test expects to stay quiet"


def test_rules_carry_severity_and_text() -> None:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_dashboard_uses_only_existing_metrics() -> None:
    known = metric_sample_names()
    used = {(where, name) for where, expr in dashboard_exprs() for name in METRIC_PATTERN.findall(expr)}
    unknown = sorted((where, name) for where, name in used if name not in known)
    assert not unknown, f"the dashboard uses metrics detector/metrics.py does not define: {unknown}"
    families = {name.removesuffix("_bucket") for _, name in used}
    for wanted in [
        "detector_records_consumed_total",  # throughput
        "detector_consumer_lag_records",  # lag
        "detector_scoring_duration_seconds",  # latency
        "detector_anomalous_windows_total",  # anomalies by stream and severity
        "detector_alerts_total",  # alerts by stream and severity
        "detector_score",  # score distributions
        "detector_dead_letters_total",  # dead-letter rate
    ]:
        assert wanted in families, f"the dashboard shows nothing of {wanted}"


# --- Kubernetes ------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_each_kind_once() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert set(k8s_objects()) == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
    }


def test_deployment_probes_point_at_the_configured_server() -> None:
    objects = k8s_objects()
    config = configmap_config(objects)
    assert config.server.enabled
    assert config.server.host == "0.0.0.0", "probes and Prometheus cannot reach a loopback server"
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/-/ready"
    assert probes["livenessProbe"]["path"] == "/-/healthy"
    assert probes["startupProbe"]["path"] == "/-/healthy"
    for probe in probes.values():
        port = ports[probe["port"]] if isinstance(probe["port"], str) else probe["port"]
        assert port == config.server.port
    # The config the container reads is the one the ConfigMap mounts.
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert config_path.name in objects["ConfigMap"]["data"]


def test_deployment_resources_security_and_grace() -> None:
    objects = k8s_objects()
    config = configmap_config(objects)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][key]), key
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # A read-only root filesystem needs a writable /tmp.
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    assert pod["terminationGracePeriodSeconds"] > config.service.grace_period_s
    # One pod at a time: every membership change is a rebalance and a window refill.
    assert objects["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_secret_feeds_the_config_through_the_environment() -> None:
    objects = k8s_objects()
    secret = objects["Secret"]
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert "KAFKA_PASSWORD" in refs
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    text = objects["ConfigMap"]["data"]["config.yaml"]
    assert "${KAFKA_PASSWORD}" in text
    assert configmap_config(objects).kafka.sasl_plain_password == "x"  # from the environment, not the file


def test_service_monitor_and_budget_select_the_pods() -> None:
    objects = k8s_objects()
    template = objects["Deployment"]["spec"]["template"]
    labels = template["metadata"]["labels"]
    port_names = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind in ("Service", "PodMonitor", "PodDisruptionBudget"):
        spec = objects[kind]["spec"]
        selector = spec["selector"] if kind == "Service" else spec["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), kind
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] in port_names
    endpoint = objects["PodMonitor"]["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    # The rules select job="detector": the PodMonitor's jobLabel must produce it.
    assert labels[objects["PodMonitor"]["spec"]["jobLabel"]] == "detector"
    assert 'job="detector"' in RULES.read_text()


def test_prometheusrule_matches_the_rules_file() -> None:
    render = load_module(K8S / "render_prometheusrule.py")
    assert (K8S / "prometheusrule.yaml").read_text() == render.render(), (
        "kubernetes/prometheusrule.yaml is stale: python deploy/kubernetes/render_prometheusrule.py"
    )


def test_keda_scaler_watches_the_configured_group_and_topics() -> None:
    config = configmap_config(k8s_objects())
    docs = {d["kind"]: d for d in load_all(K8S / "optional" / "keda-scaledobject.yaml")}
    scaled = docs["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "detector"
    assert scaled["minReplicaCount"] >= 1
    topics = {s.input.topic for s in config.streams.values() if isinstance(s.input, KafkaInput)}
    for trigger in scaled["triggers"]:
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == config.kafka.group_id
        assert trigger["metadata"]["topic"] in topics
        assert trigger["metadata"]["allowIdleConsumers"] == "false"
        assert trigger["authenticationRef"]["name"] == docs["TriggerAuthentication"]["metadata"]["name"]


def test_kustomize_builds_the_base() -> None:
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kubectl is None and kustomize is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    args = [kustomize, "build", str(K8S)] if kustomize else [str(kubectl), "kustomize", str(K8S)]
    docs = [d for d in yaml.safe_load_all(run_tool(args)) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ConfigMap", "Secret", "PodMonitor"} <= kinds
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("registry.example.com/detector:")


# --- docker ----------------------------------------------------------------------------------


def compose_config() -> Config:
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("DETECTOR_")}
    try:
        return load_config(DEPLOY / "config" / "detector.yaml")
    finally:
        os.environ.update(saved)


def test_dockerfile_is_non_root_with_a_stdlib_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (.*)$", text, re.MULTILINE | re.DOTALL)
    assert healthcheck is not None
    assert "/-/healthy" in healthcheck.group(1) and "urllib" in healthcheck.group(1)
    assert "curl" not in healthcheck.group(1) and "wget" not in healthcheck.group(1)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.MULTILINE)
    assert "download.pytorch.org/whl/cpu" in text
    assert "/etc/detector/config.yaml" in text
    assert f"EXPOSE {compose_config().server.port}" in text
    # The build context is an allow-list: the package, not .venv, models or data.
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ignore[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!detector/"} <= set(ignore)


def test_compose_config_listens_everywhere_and_matches_the_demo_models(monkeypatch: pytest.MonkeyPatch) -> None:
    config = compose_config()
    assert config.server.host == "0.0.0.0"
    assert config.kafka.bootstrap_servers == ["kafka:9092"]
    assert [s.url for s in config.sinks.alertmanager] == ["http://alertmanager:9093"]
    # The compose stack trains with `detector demo`'s generator: the streams must be the demo's.
    monkeypatch.setenv("DETECTOR_DEMO_DIR", "build/demo")
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert set(config.streams) == set(demo.streams)
    for name, stream in config.streams.items():
        assert stream.layout_hash() == demo.streams[name].layout_hash(), name
        assert stream.input == demo.streams[name].input, name


def test_compose_wires_the_services_and_mounts_existing_files() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"kafka", "detector", "prometheus", "alertmanager", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    config = compose_config()
    detector = services["detector"]
    assert "./config/detector.yaml:/etc/detector/config.yaml:ro" in detector["volumes"]
    assert any(p.endswith(f":{config.server.port}") for p in detector["ports"])
    grace = float(detector["stop_grace_period"].removesuffix("s"))
    assert grace > config.service.grace_period_s
    assert (DEPLOY / detector["build"]["context"] / detector["build"]["dockerfile"]).resolve() == DOCKERFILE
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: t
        for job in prometheus["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    assert targets["detector"] == f"detector:{config.server.port}"
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_compose_demo_feed_imports() -> None:
    # It runs inside the image and imports detector.demo: a rename there must fail here.
    module = load_module(DEPLOY / "compose" / "demo_feed.py")
    assert callable(module.train) and callable(module.produce)


def test_docker_compose_config() -> None:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        args = ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"]
    elif shutil.which("docker-compose"):
        args = ["docker-compose", "-f", str(COMPOSE), "config", "--quiet"]
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    run_tool(args)


# --- systemd ---------------------------------------------------------------------------------


def read_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case sensitive
    unit.read_string(UNIT.read_text())
    return unit


def test_systemd_unit_has_the_required_settings() -> None:
    service = read_unit()["Service"]
    grace = compose_config().service.grace_period_s
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > grace
    assert "-HUP" in service["ExecReload"]
    assert service["ExecStart"].split()[0].startswith("/")
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/detector" in service["ReadWritePaths"]
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["EnvironmentFile"].lstrip("-") == "/etc/detector/detector.env"
    env = (DEPLOY / "systemd" / "detector.env").read_text()
    assert re.search(r"^KAFKA_PASSWORD=", env, re.MULTILINE)


def test_systemd_analyze_verify() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60, check=False)
    # The daemon is not installed at /opt/detector here; every other complaint is a real one.
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "is not executable" not in line and "No such file or directory" not in line
    ]
    assert not problems, "\n".join(problems)


# --- promtool and amtool ---------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    run_tool([need("promtool"), "check", "rules", str(RULES)])


def test_promtool_test_rules() -> None:
    out = run_tool([need("promtool"), "test", "rules", str(RULE_TESTS)], cwd=RULE_TESTS.parent)
    assert "SUCCESS" in out


def test_promtool_check_config() -> None:
    run_tool([need("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = need("promtool")
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*", "$stream": ".*"}
    rules = []
    for i, (where, expr) in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_tool([promtool, "check", "rules", str(path)])


def test_amtool_check_config() -> None:
    run_tool([need("amtool"), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")])
