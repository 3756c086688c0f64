"""The Kubernetes manifests, the Ray Serve config and the Grafana dashboard under deploy/, checked offline.

No cluster is reachable here, so the checks are the ones a cluster would make first: every standard object
validates against the Kubernetes OpenAPI schema (kubernetes-validate's bundled copy, strict: unknown fields
fail), and the facts that tie the objects to each other and to the server hold: probes and scrapes hit our
routes on the container's port, selectors select, the admin token comes from the Secret key under the variable
the server reads, the registry claim is ReadWriteMany and mounted where HEADSERVE_HEADS_DIR points, and every
metric a dashboard panel queries is one /metrics exports.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from heads import BackwardAttentionConfig, BackwardAttentionHead, save_head
from heads.base import load_base
from server.app import create_app
from server.settings import Settings
from tests.integration.ready import wait_ready

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSION = kubernetes_validate.latest_version()
ENV_PREFIX = Settings.model_config["env_prefix"]
ADMIN_TOKEN_VAR = f"{ENV_PREFIX}ADMIN_TOKEN"
HEADS_DIR_VAR = f"{ENV_PREFIX}HEADS_DIR"
PORT_VAR = f"{ENV_PREFIX}PORT"
# Labels a query may group by besides our own: histogram buckets, and the target labels Prometheus adds.
PROMETHEUS_LABELS = {"le", "instance", "job"}


def _objects() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object under deploy/, by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc:
                assert doc["kind"] not in found, f"two {doc['kind']} objects ({path.name})"
                found[doc["kind"]] = doc
    return found


OBJECTS = _objects()


def _routes() -> set[str]:
    return set(create_app(Settings()).openapi()["paths"])


def _pod() -> dict[str, Any]:
    return OBJECTS["Deployment"]["spec"]["template"]


def _container() -> dict[str, Any]:
    (container,) = _pod()["spec"]["containers"]
    return container


def _env() -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in _container()["env"]}


def _container_port(name_or_number: str | int) -> int:
    ports = _container()["ports"]
    if isinstance(name_or_number, int):
        assert name_or_number in {p["containerPort"] for p in ports}
        return name_or_number
    (port,) = [p["containerPort"] for p in ports if p.get("name") == name_or_number]
    return int(port)


def test_the_expected_objects_are_there_and_kustomize_applies_all_but_the_servicemonitor() -> None:
    assert set(OBJECTS) == {"Deployment", "Service", "PersistentVolumeClaim", "Secret", "ServiceMonitor",
                            "Kustomization"}
    resources = OBJECTS["Kustomization"]["resources"]
    kinds = {doc["kind"] for name in resources for doc in yaml.safe_load_all((DEPLOY / name).read_text())}
    assert kinds == {"Deployment", "Service", "PersistentVolumeClaim", "Secret"}


@pytest.mark.parametrize("kind", ["Deployment", "Service", "PersistentVolumeClaim", "Secret"])
def test_standard_objects_validate_against_the_kubernetes_schema(kind: str) -> None:
    kubernetes_validate.validate(OBJECTS[kind], K8S_VERSION, strict=True)


def test_the_schema_check_would_catch_a_mistake() -> None:
    broken = json.loads(json.dumps(OBJECTS["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_probes_hit_our_health_routes_on_the_server_port() -> None:
    container, routes = _container(), _routes()
    ready, alive = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], alive["path"]) == ("/readyz", "/healthz")
    assert {"/readyz", "/healthz"} <= routes
    server_port = int(_env()[PORT_VAR]["value"])
    assert _container_port(ready["port"]) == _container_port(alive["port"]) == server_port
    assert f"EXPOSE {server_port}" in (REPO / "Dockerfile").read_text()
    assert _env()[f"{ENV_PREFIX}HOST"]["value"] == "0.0.0.0"  # reachable by the kubelet and the Service


def test_the_pod_runs_as_the_image_user_with_threads_for_the_cpus_it_requests() -> None:
    uid = _pod()["spec"]["securityContext"]["runAsUser"]
    assert f"--uid {uid} headserve" in (REPO / "Dockerfile").read_text()
    assert _env()["OMP_NUM_THREADS"]["value"] == _container()["resources"]["requests"]["cpu"]


def test_every_server_variable_names_a_setting() -> None:
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    ours = {name for name in _env() if name.startswith(ENV_PREFIX)}
    assert ours and ours <= known, ours - known


def test_the_admin_token_comes_from_the_secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _env()[ADMIN_TOKEN_VAR]["valueFrom"]["secretKeyRef"]
    secret = OBJECTS["Secret"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    # The shipped Secret is empty: the server counts it as unset and, beyond loopback, serves read-only.
    monkeypatch.setenv(ADMIN_TOKEN_VAR, secret["stringData"][ref["key"]])
    settings = Settings(host=_env()[f"{ENV_PREFIX}HOST"]["value"])
    assert settings.admin_token is None and not settings.listens_on_loopback


def test_the_registry_claim_is_read_write_many_and_holds_heads_dir() -> None:
    claim = OBJECTS["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    (volume,) = [v for v in _pod()["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (mount,) = [m for m in _container()["volumeMounts"] if m["name"] == volume["name"]]
    heads_dir = Path(_env()[HEADS_DIR_VAR]["value"])
    assert heads_dir.is_relative_to(mount["mountPath"]) and heads_dir != Path(mount["mountPath"])
    (seed,) = _pod()["spec"]["initContainers"]
    assert [m["mountPath"] for m in seed["volumeMounts"] if m["name"] == volume["name"]] == [mount["mountPath"]]


@pytest.fixture
def seed_script(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """The init container's script, pointed at a temporary claim and image registry instead of /data and /heads."""
    (seed,) = _pod()["spec"]["initContainers"]
    script = seed["command"][-1]
    claim, shipped = tmp_path / "data", tmp_path / "image-heads"
    claim.mkdir()
    (shipped / "math").mkdir(parents=True)
    (shipped / "math" / "head_config.json").write_text("{}")
    heads_dir = Path(_env()[HEADS_DIR_VAR]["value"])
    assert str(heads_dir).startswith("/data/") and " /heads " in script
    yield script.replace("/data", str(claim)).replace(" /heads ", f" {shipped} "), claim, shipped


def test_the_init_container_seeds_a_new_claim_once(seed_script: tuple[str, Path, Path]) -> None:
    script, claim, _ = seed_script
    subprocess.run(["sh", "-c", script], check=True, env={"HOSTNAME": "pod-a", "PATH": "/usr/bin:/bin"})
    assert (claim / "heads" / "math" / "head_config.json").read_text() == "{}"
    assert sorted(p.name for p in claim.iterdir()) == ["heads"]  # no staging folder left behind
    # A head deleted later stays deleted when a pod restarts: the registry exists, so nothing is copied.
    (claim / "heads" / "math" / "head_config.json").unlink()
    (claim / "heads" / "math").rmdir()
    subprocess.run(["sh", "-c", script], check=True, env={"HOSTNAME": "pod-b", "PATH": "/usr/bin:/bin"})
    assert list((claim / "heads").iterdir()) == []


def test_selectors_select_and_the_service_targets_the_container_port() -> None:
    deployment, service, monitor = OBJECTS["Deployment"], OBJECTS["Service"], OBJECTS["ServiceMonitor"]
    pod_labels = _pod()["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert _container_port(port["targetPort"]) == int(_env()[PORT_VAR]["value"])
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_prometheus_scrapes_metrics_on_the_server_port() -> None:
    annotations, routes = _pod()["metadata"]["annotations"], _routes()
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == int(_env()[PORT_VAR]["value"])
    assert annotations["prometheus.io/path"] in routes
    monitor = OBJECTS["ServiceMonitor"]
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    service_ports = {p["name"] for p in OBJECTS["Service"]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"


def test_the_ray_serve_config_validates_and_names_real_settings() -> None:
    from ray.serve.schema import ServeDeploySchema  # imported here: the Ray test sets Ray's environment first

    from server.ray_app import RaySettings, build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY / "ray-serve.yaml").read_text()))
    (app,) = config.applications
    module, name = app.import_path.split(":")
    assert (module, name) == (build_app.__module__, build_app.__name__)
    assert app.args and set(app.args) <= set(RaySettings.model_fields) | set(Settings.model_fields)
    assert app.args["heads_dir"] == _env()[HEADS_DIR_VAR]["value"]  # the same layout as the Kubernetes pods


# The dashboard: every panel queries metrics (and labels) the real /metrics exports.

def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


@pytest.fixture(scope="module")
def exported(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, set[str]], set[str]]:
    """What a real app's /metrics exports after generating with the base and with a head: sample name -> label
    names, and the route labels seen. A family with no sample yet (no request has failed) gets the label names
    its metric declares."""
    base = load_base(str(tiny_base_dir))
    registry = tmp_path_factory.mktemp("registry")
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8), vocab_size=base.vocab_size, n_embd=base.n_embd)
    save_head(head, registry / "math", base.info(), task="math")
    settings = Settings(base_model=str(tiny_base_dir), heads_dir=registry, device="cpu")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        for name in (None, "math"):
            request = {"prompt": "1 plus 1", "max_new_tokens": 3, "head": name}
            assert client.post("/generate", json=request).status_code == 200
        text = client.get("/metrics").text
        declared = {metric._name: set(metric._labelnames) for metric in vars(client.app.state.metrics).values()
                    if isinstance(metric, MetricWrapperBase)}
    samples: dict[str, set[str]] = {}
    routes: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            samples.setdefault(family.name + suffix, set())
            if not family.samples:
                samples[family.name + suffix] |= declared[family.name]
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
            routes.update({sample.labels["route"]} if "route" in sample.labels else set())
    return samples, routes


def test_every_dashboard_query_uses_exported_metrics_and_labels(
        exported: tuple[dict[str, set[str]], set[str]]) -> None:
    samples, _ = exported
    queries = _dashboard_queries()
    used = set()
    for title, expr in queries:
        metrics = set(re.findall(r"\bheadserve_[a-z_]+", expr))
        assert metrics, f"{title}: queries none of our metrics"
        assert metrics <= set(samples), f"{title}: {metrics - set(samples)} not in /metrics"
        used |= metrics
        labels = set().union(*(samples[m] for m in metrics)) | PROMETHEUS_LABELS
        grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
        selected = set(re.findall(r"[{,]\s*([a-z_]+)\s*=~?", expr))
        assert grouped | selected <= labels, f"{title}: labels {(grouped | selected) - labels} not on {metrics}"
    # Every metric family we export is on the dashboard.
    families = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in samples if not name.endswith("_created")}
    assert families <= {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in used}


def test_dashboard_route_filters_name_real_routes(exported: tuple[dict[str, set[str]], set[str]]) -> None:
    _, observed = exported
    assert "/generate" in observed  # the route label is the route's path, as the filters assume
    routes = _routes()
    for title, expr in _dashboard_queries():
        for pattern in re.findall(r'route=~?"([^"]+)"', expr):
            assert set(pattern.split("|")) <= routes, f"{title}: {pattern}"
