"""Deployment artefacts: Dockerfile, Kubernetes manifests, docker-compose stack.

No Docker engine or cluster runs here, so these are static checks of what must agree across
files: ports (9800 everywhere), probe paths, the security context, secrets as env vars, volume
paths against the config, service wiring, and the PrometheusRule against the rule files.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PORT = 9800

from stream_fair import config as sf_config  # noqa: E402  (after the path constants on purpose)


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _k8s(kind: str) -> dict[str, Any]:
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == kind and path.name != "secret.example.yaml":
                return doc
    raise AssertionError(f"no {kind} in {K8S}")


def _sidecar() -> dict[str, Any]:
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "stream-fair"]
    return container


def _config_env() -> dict[str, str]:
    return {
        sf_config.env_name("kafka.sasl_username"): "user",
        sf_config.env_name("kafka.sasl_password"): "secret",
    }


# ------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "path",
    sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), *(ROOT / "grafana").rglob("*.yml")]),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_default_exporter_port_is_9800() -> None:
    assert sf_config.ExporterConfig.model_fields["port"].default == PORT


@pytest.mark.parametrize(
    "path",
    [K8S / "config.yaml", DEPLOY / "compose" / "stream-fair.yaml"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_configs_load_with_the_app_loader(path: Path) -> None:
    cfg = sf_config.load(path, environ=_config_env())
    assert cfg.exporter.port == PORT
    assert str(cfg.state.path).startswith("/var/lib/stream-fair/")


# ---------------------------------------------------------------------------------- Dockerfile
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    return re.findall(rf"^{name}\s+(.*)$", DOCKERFILE, re.M)


def test_dockerfile_base_user_port_entrypoint() -> None:
    assert all(re.fullmatch(r"python:3\.\d+-slim( AS \w+)?", f) for f in _instructions("FROM"))
    (user,) = _instructions("USER")
    assert user.split(":")[0] not in {"root", "0"}
    assert _instructions("EXPOSE") == [str(PORT)]
    assert _instructions("ENTRYPOINT") == ['["stream-fair", "run"]']
    assert "pip install" in DOCKERFILE and f"127.0.0.1:{PORT}/healthz" in DOCKERFILE
    assert "chown 10001:10001 /var/lib/stream-fair" in DOCKERFILE
    assert user.split(":")[0] == "10001"


def test_dockerfile_copies_existing_files() -> None:
    for args in _instructions("COPY"):
        if args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context (repo root)"


def test_dockerignore_keeps_what_is_copied() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for kept in ("!pyproject.toml", "!README.md", "!stream_fair/**"):
        assert kept in ignore


def test_entrypoint_is_a_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["stream-fair"] == "stream_fair.cli:main"


# ---------------------------------------------------------------------------------- Kubernetes
def test_sidecar_port_and_probes() -> None:
    c = _sidecar()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"sf-metrics": PORT}
    # the example serves HTTPS (exporter.web_config_file); the probe paths need no credentials
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "sf-metrics", "scheme": "HTTPS"}
    assert c["startupProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["args"] == ["--config", "/etc/stream-fair/config.yaml"]


def test_the_sidecar_can_never_take_the_model_out_of_service() -> None:
    """A pod is Ready only when all its containers are: a readiness probe on the sidecar's /readyz
    (503 while Kafka is unreachable or partitions restore) would take the model out of its Service."""
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    assert "readinessProbe" not in _sidecar()
    for c in pod["containers"]:
        probe = c.get("readinessProbe") or {}
        assert (probe.get("httpGet") or {}).get("port") not in ("sf-metrics", PORT), c["name"]
    doc = (ROOT / "docs" / "deployment.md").read_text()
    assert "no readiness probe" in doc


def test_security_context() -> None:
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]


def test_kafka_credentials_from_a_secret() -> None:
    env = {e["name"]: e for e in _sidecar()["env"]}
    for name in _config_env():
        assert "secretKeyRef" in env[name]["valueFrom"], name
        assert "value" not in env[name]
    assert "sasl_password" not in (K8S / "config.yaml").read_text()


def test_volumes_match_the_config() -> None:
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in _sidecar()["volumeMounts"]}
    cfg = sf_config.load(K8S / "config.yaml", environ=_config_env())
    state_dir = posixpath.dirname(str(cfg.state.path))
    assert state_dir in mounts and not mounts[state_dir].get("readOnly")
    state_volume = volumes[mounts[state_dir]["name"]]
    assert "emptyDir" in state_volume or "persistentVolumeClaim" in state_volume
    config_mount = mounts["/etc/stream-fair"]
    assert config_mount["readOnly"] is True
    generated = _yaml(K8S / "kustomization.yaml")["configMapGenerator"]
    assert volumes[config_mount["name"]]["configMap"]["name"] in {g["name"] for g in generated}
    assert "/tmp" in mounts  # a writable /tmp under readOnlyRootFilesystem


def _quantity(text: str) -> float:
    """Bytes of a Kubernetes quantity such as 2Gi, 500M or 1e9."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.e+]+)([KMGT]i|[kMGT])?", str(text))
    assert match, text
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


def test_the_state_store_fits_its_volume() -> None:
    """Review finding: the state volume is an emptyDir of 2Gi while join.max_pending was left at
    300 million per partition (~100 bytes each on disk): the store would fill the volume and the
    kubelet evict the whole pod, the model with it. join.max_pending_bytes bounds the store below
    the volume's sizeLimit, with room for RocksDB's WAL and compactions."""
    volumes = {v["name"]: v for v in _k8s("Deployment")["spec"]["template"]["spec"]["volumes"]}
    state = volumes["stream-fair-state"]
    assert "emptyDir" in state, "the shipped state volume is an emptyDir: check a PVC's size here instead"
    limit = _quantity(state["emptyDir"]["sizeLimit"])
    budget = sf_config.load(K8S / "config.yaml", environ=_config_env()).join.max_pending_bytes
    assert budget is not None, "set join.max_pending_bytes below the state volume's sizeLimit"
    assert 0.5 * limit <= budget <= 0.8 * limit, (budget, limit)


def test_podmonitor_selects_the_pods_and_port() -> None:
    monitor = _k8s("PodMonitor")["spec"]
    labels = _k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "sf-metrics" and endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True
    relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    # the alert rules select up{job="stream-fair"}
    assert relabel["job"]["replacement"] == "stream-fair"
    assert 'up{job="stream-fair"}' in (DEPLOY / "prometheus" / "alert_rules.yml").read_text()
    (source,) = relabel["model"]["sourceLabels"]
    pod_label = next(
        k
        for k in labels
        if re.sub(r"[^a-zA-Z0-9]", "_", k) == source.removeprefix("__meta_kubernetes_pod_label_")
    )
    assert labels[pod_label] == "credit-v3"


def test_podmonitor_scrapes_the_web_config_it_mounts() -> None:
    """TLS + basic auth end to end in the manifests: the config names a web config that the pod
    mounts from a Secret, the probes speak HTTPS, and the PodMonitor scrapes with https and
    basic auth; the example web config is in the exporter-toolkit format the exporter reads."""
    from stream_fair.web import parse_web_config

    cfg = sf_config.load(K8S / "config.yaml", environ=_config_env())
    assert cfg.exporter.web_config_file is not None
    web_dir = posixpath.dirname(str(cfg.exporter.web_config_file))
    mounts = {m["mountPath"]: m for m in _sidecar()["volumeMounts"]}
    volumes = {v["name"]: v for v in _k8s("Deployment")["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mounts[web_dir]["name"]]["secret"]["secretName"]
    examples = {
        d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text())
    }
    web = yaml.safe_load(
        examples[secret]["stringData"][posixpath.basename(str(cfg.exporter.web_config_file))]
    )
    assert set(web["tls_server_config"]) == {"cert_file", "key_file"}
    assert set(web["tls_server_config"].values()) <= set(examples[secret]["stringData"])
    assert parse_web_config({"basic_auth_users": web["basic_auth_users"]}, ".").users
    (endpoint,) = _k8s("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "https" and endpoint["basicAuth"]["password"]["name"] in examples
    assert endpoint["tlsConfig"]["ca"]["secret"]["name"] in examples
    assert _sidecar()["startupProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_kustomization_resources_exist() -> None:
    kustomization = _yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).exists(), resource
    for generator in kustomization["configMapGenerator"]:
        for file in generator["files"]:
            assert (K8S / file).exists(), file
    assert "secret.example.yaml" not in kustomization["resources"]
    kinds = {yaml.safe_load((K8S / r).read_text())["kind"] for r in kustomization["resources"]}
    assert kinds == {"Deployment", "PodMonitor", "PrometheusRule"}


def test_prometheusrule_equals_the_rule_files() -> None:
    groups = [
        g
        for name in ("recording_rules.yml", "alert_rules.yml")
        for g in _yaml(DEPLOY / "prometheus" / name)["groups"]
    ]
    assert _k8s("PrometheusRule")["spec"]["groups"] == groups
    result = subprocess.run(
        [sys.executable, str(K8S / "build_prometheusrule.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------------------------------- compose
COMPOSE = _yaml(DEPLOY / "docker-compose.yml")
SERVICES = COMPOSE["services"]


def _host_path(volume: str) -> Path | None:
    source = volume.split(":")[0]
    return (DEPLOY / source).resolve() if source.startswith(".") else None


def _mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    out = {}
    for volume in SERVICES[service].get("volumes", []):
        host = _host_path(volume)
        if host is not None:
            out[volume.split(":")[1]] = host
    return out


def test_compose_services() -> None:
    assert {"kafka", "stream-fair", "prometheus", "alertmanager", "grafana"} <= set(SERVICES)
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")


def test_compose_mounted_files_and_build_exist() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            path = _host_path(volume)
            if path is not None:
                assert path.exists(), f"{name}: {volume}"
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context == ROOT
            assert (context / service["build"]["dockerfile"]).exists()


def test_compose_stream_fair_service() -> None:
    service = SERVICES["stream-fair"]
    assert service["ports"] == [f"{PORT}:{PORT}"]
    assert f"127.0.0.1:{PORT}/readyz" in " ".join(service["healthcheck"]["test"])
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    cfg = sf_config.load(_mounts("stream-fair")["/etc/stream-fair/config.yaml"], environ={})
    advertised = SERVICES["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//{cfg.kafka.bootstrap_servers}" in advertised
    assert cfg.exporter.port == PORT
    state_mount = next(v for v in service["volumes"] if v.split(":")[1] == "/var/lib/stream-fair")
    assert state_mount.split(":")[0] in COMPOSE["volumes"]
    assert posixpath.dirname(str(cfg.state.path)) == "/var/lib/stream-fair"


def test_compose_prometheus_wiring() -> None:
    service = SERVICES["prometheus"]
    mounts = _mounts("prometheus")
    prom = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    scrape = {job["job_name"]: job for job in prom["scrape_configs"]}
    assert scrape["stream-fair"]["static_configs"][0]["targets"] == [f"stream-fair:{PORT}"]
    assert scrape["stream-fair"]["honor_labels"] is True
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert "alertmanager" in SERVICES and "9093:9093" in SERVICES["alertmanager"]["ports"]
    # both rule files are mounted where rule_files looks
    (pattern,) = prom["rule_files"]
    rule_mounts = [m for m in mounts if posixpath.dirname(m) == posixpath.dirname(pattern)]
    assert sorted(mounts[m].name for m in rule_mounts) == ["alert_rules.yml", "recording_rules.yml"]
    assert set(service["depends_on"]) >= {"stream-fair", "alertmanager"}


def test_compose_prometheus_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: apt-get install -y --no-install-recommends prometheus")
    result = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "compose" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_alertmanager_and_grafana_wiring() -> None:
    am = _mounts("alertmanager")
    assert (
        am["/etc/alertmanager/alertmanager.yml"] == (DEPLOY / "alertmanager" / "alertmanager.yml").resolve()
    )
    assert "--cluster.listen-address=" in SERVICES["alertmanager"]["command"]
    grafana = _mounts("grafana")
    assert grafana["/etc/grafana/provisioning"] == (ROOT / "grafana" / "provisioning").resolve()
    provider = _yaml(ROOT / "grafana" / "provisioning" / "dashboards" / "stream-fair.yml")["providers"][0]
    assert grafana[provider["options"]["path"]] == (ROOT / "grafana" / "dashboards").resolve()
    source = _yaml(ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and "9090:9090" in SERVICES["prometheus"]["ports"]
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (grafana[posixpath.dirname(home)] / posixpath.basename(home)).exists()
