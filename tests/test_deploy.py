"""What ships beside the code: Kubernetes manifests, Prometheus rules, the Grafana dashboard.
The validators (kubernetes-validate, checkov, parliament) run in `make validate`; these tests
hold the parts to the code: the config loads, the security context is everywhere, the rules
parse and name only metrics the daemon exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from conftest import ROOT

from poller.config import load_settings
from poller.serving.metrics import Metrics

DEPLOY = ROOT / "deploy"
WORKLOADS = ("CronJob", "Deployment", "Job")


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and "kind" in document and document["kind"] != "Kustomization":
                found.append((path, document))
    return found


def pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    spec = document["spec"]
    if document["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def test_the_cluster_config_is_valid_configuration():
    settings = load_settings(DEPLOY / "kubernetes/base/config.yaml", environ={})
    assert settings.s3.bucket and settings.log.format == "json"


def test_every_kustomization_names_files_that_exist():
    for path in (DEPLOY).rglob("kustomization.yaml"):
        document = yaml.safe_load(path.read_text())
        for resource in document.get("resources", []):
            assert (path.parent / resource).exists(), f"{path}: {resource}"
        for generator in document.get("configMapGenerator", []):
            for name in generator.get("files", []):
                assert (path.parent / name).exists(), f"{path}: {name}"


@pytest.mark.parametrize("kind", WORKLOADS)
def test_every_workload_runs_locked_down_with_credentials_as_files(kind: str):
    workloads = [(p, d) for p, d in manifests() if d["kind"] == kind]
    assert workloads, kind
    secret = next(
        d
        for _, d in manifests()
        if d["kind"] == "Secret" and d["metadata"]["name"] == "poller-threatstack"
    )
    for path, document in workloads:
        spec = pod_spec(document)
        assert spec["securityContext"]["runAsNonRoot"] is True, path
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", path
        assert spec["automountServiceAccountToken"] is False, path
        assert spec["terminationGracePeriodSeconds"] >= 120 + 10, path  # a request's deadline
        (container,) = spec["containers"]
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, path
        assert context["allowPrivilegeEscalation"] is False, path
        assert context["capabilities"]["drop"] == ["ALL"], path
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], path
        env = {e["name"]: e["value"] for e in container["env"]}
        for name in ("USER_ID", "ORG_ID", "API_KEY"):
            file_path = env[f"THREATSTACK_{name}_FILE"]
            assert file_path.rsplit("/", 1)[1] in secret["stringData"], path
        assert container["resources"]["limits"]["memory"], path


def test_the_cronjob_treats_exit_75_as_benign_and_never_overlaps():
    (cron,) = [d for _, d in manifests() if d["kind"] == "CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    rules = cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert {
        "action": "Ignore",
        "onExitCodes": {"containerName": "poller", "operator": "In", "values": [75]},
    } in rules


def test_the_daemon_and_the_push_path_are_probed_on_their_health_endpoints():
    deployments = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Deployment"}
    assert deployments["poller"]["spec"]["replicas"] == 1  # a second would only stand by
    for name, args in (("poller", ["run"]), ("poller-push", ["serve"])):
        (container,) = pod_spec(deployments[name])["containers"]
        assert container["args"] == args
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (push,) = pod_spec(deployments["poller-push"])["containers"]
    env = {e["name"]: e["value"] for e in push["env"]}
    secrets = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Secret"}
    token_file = env["POLLER_RECEIVER__TOKEN_FILE"]
    assert token_file.rsplit("/", 1)[1] in secrets["poller-push-token"]["stringData"]


def test_the_push_routes_have_their_own_port_and_the_probes_stay_off_it():
    """receiver.port keeps the probes on a listener no webhook sender can flood; the
    Service sends webhooks to that port only, and a NetworkPolicy admits it."""
    found = {(d["kind"], d["metadata"]["name"]): d for _, d in manifests()}
    (push,) = pod_spec(found["Deployment", "poller-push"])["containers"]
    env = {e["name"]: e["value"] for e in push["env"]}
    ports = {p["name"]: p["containerPort"] for p in push["ports"]}
    settings = load_settings(
        DEPLOY / "kubernetes/base/config.yaml",
        environ={"POLLER_RECEIVER__PORT": env["POLLER_RECEIVER__PORT"]},
    )
    assert settings.receiver.port == ports["push"] != settings.http.port == ports["http"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert push[probe]["httpGet"]["port"] == "http"
    (service_port,) = found["Service", "poller-push"]["spec"]["ports"]
    assert service_port["targetPort"] == "push"
    admitted = {
        port["port"]
        for (kind, _), d in found.items()
        if kind == "NetworkPolicy"
        for rule in d["spec"]["ingress"]
        for port in rule["ports"]
    }
    assert {ports["http"], ports["push"]} <= admitted


def exported_metrics() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        if family.type == "counter":  # exposed as NAME_total (and NAME_created)
            names.add(family.name + "_total")
        names.update(sample.name for sample in family.samples)
    return names


def metric_names(node: Any) -> set[str]:
    """The metric names a parsed PromQL expression selects."""
    found = set()
    if type(node).__name__ == "VectorSelector" and node.name:
        found.add(node.name)
    for attribute in ("lhs", "rhs", "expr", "vector_selector", "param"):
        child = getattr(node, attribute, None)
        if child is not None and not isinstance(child, (str, int, float)):
            found |= metric_names(child)
    for child in getattr(node, "args", None) or []:
        found |= metric_names(child)
    return found


def expressions() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus/poller-rules.yaml").read_text())
    found = [r["expr"] for group in rules["spec"]["groups"] for r in group["rules"]]
    dashboard = json.loads((DEPLOY / "grafana/poller-dashboard.json").read_text())
    found += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return found


def test_every_rule_and_panel_parses_and_names_only_exported_metrics():
    exported = exported_metrics()
    seen: set[str] = set()
    for expression in expressions():
        names = metric_names(promql_parser.parse(expression))
        assert names, expression
        assert names <= exported, (expression, names - exported)
        seen |= names
    # The alerts cover lag, success, failures, quarantine and the budget.
    assert {
        "poller_watermark_timestamp_seconds",
        "poller_last_success_timestamp_seconds",
        "poller_cycles_total",
        "poller_alerts_total",
        "poller_api_requests_last_minute",
    } <= seen
