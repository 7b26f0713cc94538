"""Static checks of the production deployment files under infra/ (compose, Kubernetes, Dockerfile).

Nothing here starts Docker or Kubernetes (neither exists on CI's machines). The tests hold the files
to the facts the code relies on: every WANFACTORY_* name is a real setting, the flow's settings point
at things that exist (the Ray head's client port, the MinIO service, the model cache mount), one
image with the pinned Ray runs every Ray node and the flow, each GPU worker pod holds exactly one GPU,
and no secret sits in plain configuration.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import SecretStr

from infra.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])

SETTING_VARS = {f"WANFACTORY_{name.upper()}" for name in Settings.model_fields}
SECRET_SETTING_VARS = {
    f"WANFACTORY_{name.upper()}"
    for name, field in Settings.model_fields.items()
    if field.annotation is SecretStr or SecretStr in get_args(field.annotation)  # optional ones too
}
WANFACTORY_VAR = re.compile(r"WANFACTORY_[A-Z0-9_]+")
SECRET_WORD = re.compile(r"SECRET|PASSWORD|TOKEN")
GPU = "nvidia.com/gpu"
COMPOSE_SERVICES = {"minio", "prefect-server", "prefect-worker", "ray-head", "ray-worker"}


def _ray_pin() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", requirement.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml does not pin ray with ==")


RAY_PIN = _ray_pin()


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in _load_all(path)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        obj
        for obj in _k8s_objects()
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _config() -> dict[str, str]:
    return _one("ConfigMap", "wanfactory-config")["data"]


def _raycluster() -> dict[str, Any]:
    return _one("RayCluster")


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_env(service: str) -> dict[str, str]:
    env = _compose()["services"][service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of nested mappings and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec.get("containers", []) + pod_spec.get("initContainers", [])


def _env_value(container: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((var for var in container.get("env", []) if var["name"] == name), None)


def _quantity(resources: dict[str, Any], section: str) -> str | None:
    value = resources.get(section, {}).get(GPU)
    return None if value is None else str(value)


# --- every file -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{path} is empty"
    if path.parent == K8S:
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "wanfactory", doc["metadata"]


def test_the_deployment_files_exist() -> None:
    expected = {
        "namespace.yaml",
        "minio.yaml",
        "prefect-server.yaml",
        "prefect-worker.yaml",
        "raycluster.yaml",
        "config.yaml",
        "secret.example.yaml",
    }
    assert expected <= {path.name for path in K8S.glob("*.yaml")}
    assert COMPOSE.is_file() and DOCKERFILE.is_file() and (INFRA / "DEPLOY.md").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_wanfactory_name_is_a_setting(path: Path) -> None:
    unknown = set(WANFACTORY_VAR.findall(path.read_text())) - SETTING_VARS
    assert not unknown, f"{path.name} names variables that infra.settings.Settings does not read: {unknown}"


def test_the_env_the_flow_gets_is_all_settings() -> None:
    k8s_names = set(_config()) | set(_one("Secret", "wanfactory-s3")["stringData"])
    compose_names = {name for name in _compose_env("prefect-worker") if name.startswith("WANFACTORY_")}
    for names in (k8s_names, compose_names):
        assert names, "no WANFACTORY_* variables found"
        assert names <= SETTING_VARS, names - SETTING_VARS
        assert {"WANFACTORY_S3_ACCESS_KEY", "WANFACTORY_S3_SECRET_KEY", "WANFACTORY_RAY_ADDRESS"} <= names


def test_configmap_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _config().items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert settings.model_variant == "full"
    assert settings.model_root.startswith(f"s3://{settings.s3_bucket}/")
    assert settings.adapter_root.startswith(f"s3://{settings.s3_bucket}/")
    assert settings.catalog_uri.startswith(f"s3://{settings.s3_bucket}/")


def test_compose_literal_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _compose_env("prefect-worker").items():
        if key.startswith("WANFACTORY_") and "${" not in value:
            monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert settings.model_variant == "full"
    assert settings.model_root == "s3://wanfactory/models/wan2.2"


# --- secrets --------------------------------------------------------------------------------------


def test_configmap_holds_no_secrets() -> None:
    for key in _config():
        assert not SECRET_WORD.search(key), f"{key} belongs in a Secret"
        assert key not in SECRET_SETTING_VARS, f"{key} is a SecretStr setting"


def test_secret_example_is_only_placeholders() -> None:
    secrets = [doc for doc in _load_all(K8S / "secret.example.yaml") if doc["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        assert "data" not in secret, "use stringData so the placeholders stay readable"
        for key, value in secret["stringData"].items():
            assert "CHANGE-ME" in value, f"{secret['metadata']['name']}.{key} is not a placeholder"


def test_secret_and_configmap_references_resolve() -> None:
    objects = _k8s_objects()
    secrets = {o["metadata"]["name"]: set(o["stringData"]) for o in objects if o["kind"] == "Secret"}
    configs = {o["metadata"]["name"]: set(o["data"]) for o in objects if o["kind"] == "ConfigMap"}
    references = 0
    for obj in objects:
        for key, value in _walk(obj):
            if key in ("secretKeyRef", "configMapKeyRef"):
                known = secrets if key == "secretKeyRef" else configs
                assert value["key"] in known.get(value["name"], set()), value
                references += 1
            elif key in ("secretRef", "configMapRef"):
                assert value["name"] in (secrets if key == "secretRef" else configs), value
                references += 1
    assert references


def test_compose_hardcodes_no_secret() -> None:
    for name in _compose()["services"]:
        for key, value in _compose_env(name).items():
            if SECRET_WORD.search(key) or key in SECRET_SETTING_VARS:
                # Required (`:?`), or optional with nothing in its place (`:-`).
                assert re.fullmatch(r"\$\{\w+(:\?[^}]+|:-)\}", value), (
                    f"{name}: {key} must come from infra/.env"
                )
        assert "MINIO_ROOT_PASSWORD" not in _compose_env(name) or name in ("minio", "minio-init"), name


# --- Ray ------------------------------------------------------------------------------------------


def _ray_pod_specs() -> dict[str, dict[str, Any]]:
    spec = _raycluster()["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def test_gpu_workers_hold_exactly_one_gpu_and_the_head_none() -> None:
    spec = _raycluster()["spec"]
    for container in _containers(spec["headGroupSpec"]["template"]["spec"]):
        resources = container.get("resources", {})
        assert _quantity(resources, "requests") is None and _quantity(resources, "limits") is None
    assert spec["headGroupSpec"]["rayStartParams"].get("num-gpus", "0") == "0"

    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        containers = _containers(group["template"]["spec"])
        gpus = [
            (_quantity(c.get("resources", {}), "requests"), _quantity(c.get("resources", {}), "limits"))
            for c in containers
        ]
        if any(g != (None, None) for g in gpus):
            gpu_groups += 1
            assert [g for g in gpus if g != (None, None)] == [("1", "1")], f"{group['groupName']}: {gpus}"
            assert group["rayStartParams"].get("num-gpus", "1") == "1"
            # The flow sizes its fleet from the GPUs present when a run starts: a group that can
            # shrink to zero would make a run plan no GPU actors at all.
            assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert gpu_groups >= 1


def test_raycluster_is_autoscaling_friendly() -> None:
    spec = _raycluster()["spec"]
    assert _raycluster()["apiVersion"] == "ray.io/v1"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for params in (group["rayStartParams"] for group in groups):
        # KubeRay's CRD types rayStartParams as map[string]string.
        assert all(isinstance(value, str) for value in params.values()), params


def test_ray_version_matches_the_pin() -> None:
    assert _raycluster()["spec"]["rayVersion"] == RAY_PIN
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(RAY_PIN)}$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", dockerfile, re.MULTILINE)
    assert "ray==%s" in dockerfile and "${RAY_VERSION}" in dockerfile, "pip must be held to the image's Ray"
    build_args = _compose()["services"]["ray-head"]["build"]["args"]
    assert str(build_args["RAY_VERSION"]) == RAY_PIN
    for path in YAML_FILES:
        for tag in re.findall(r"rayproject/ray:([\w.-]+)", path.read_text()):
            assert tag.startswith(f"{RAY_PIN}-"), f"{path.name}: rayproject/ray:{tag}"


def test_one_image_runs_the_ray_nodes_and_the_flow() -> None:
    images = {name: {c["image"] for c in _containers(pod)} for name, pod in _ray_pod_specs().items()}
    worker = _one("Deployment", "prefect-worker")["spec"]["template"]["spec"]
    images["prefect-worker"] = {c["image"] for c in _containers(worker)}
    assert len(set().union(*images.values())) == 1, images

    services = _compose()["services"]
    assert len({services[name]["image"] for name in ("ray-head", "ray-worker", "prefect-worker")}) == 1


def test_token_auth_is_on_for_every_ray_process_and_the_client() -> None:
    spec = _raycluster()["spec"]
    worker = _one("Deployment", "prefect-worker")["spec"]["template"]["spec"]
    holders = [c for pod in _ray_pod_specs().values() for c in _containers(pod)]
    holders += [{"name": "autoscaler", "env": spec["autoscalerOptions"]["env"]}, *_containers(worker)]
    for container in holders:
        assert (_env_value(container, "RAY_AUTH_MODE") or {}).get("value") == "token", container["name"]
        token = _env_value(container, "RAY_AUTH_TOKEN") or {}
        assert token.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "ray-auth", container["name"]

    for name in ("ray-head", "ray-worker", "prefect-worker"):
        env = _compose_env(name)
        assert env.get("RAY_AUTH_MODE") == "token", name
        assert env.get("RAY_AUTH_TOKEN", "").startswith("${RAY_AUTH_TOKEN:?"), name


def test_ray_address_is_the_head_client_port() -> None:
    cluster = _raycluster()
    head = _containers(cluster["spec"]["headGroupSpec"]["template"]["spec"])[0]
    client_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "client")
    head_service = f"{cluster['metadata']['name']}-head-svc"
    assert _config()["WANFACTORY_RAY_ADDRESS"] == f"ray://{head_service}:{client_port}"

    match = re.fullmatch(r"ray://([\w-]+):(\d+)", _compose_env("prefect-worker")["WANFACTORY_RAY_ADDRESS"])
    assert match, "compose must use Ray Client (ray://): the worker container is not a Ray node"
    host, port = match.groups()
    assert host == "ray-head"
    assert f"--ray-client-server-port={port}" in _compose()["services"]["ray-head"]["command"]


def test_model_cache_is_mounted_where_the_flow_points_the_actors() -> None:
    cache_dir = _config()["WANFACTORY_MODEL_CACHE_DIR"]
    for group in _raycluster()["spec"]["workerGroupSpecs"]:
        containers = _containers(group["template"]["spec"])
        mounts = {m["mountPath"] for c in containers for m in c.get("volumeMounts", [])}
        assert cache_dir in mounts, f"{group['groupName']} does not mount {cache_dir}"

    compose_cache = _compose_env("prefect-worker")["WANFACTORY_MODEL_CACHE_DIR"]
    volumes = _compose()["services"]["ray-worker"]["volumes"]
    assert any(str(v).split(":")[1] == compose_cache for v in volumes), volumes


def test_s3_endpoint_is_the_minio_service_and_the_bucket_is_created() -> None:
    services = {o["metadata"]["name"]: o for o in _k8s_objects() if o["kind"] == "Service"}
    host, port = _config()["WANFACTORY_S3_ENDPOINT"].split(":")
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    init = _containers(_one("Job", "minio-init")["spec"]["template"]["spec"])[0]
    assert f"local/{_config()['WANFACTORY_S3_BUCKET']}" in "\n".join(init["args"])

    env, services = _compose_env("prefect-worker"), _compose()["services"]
    assert env["WANFACTORY_S3_ENDPOINT"].split(":")[0] in services
    assert f"local/{env['WANFACTORY_S3_BUCKET']}" in "\n".join(services["minio-init"]["command"])


# --- compose ---------------------------------------------------------------------------------------


def test_compose_has_the_stack() -> None:
    services = _compose()["services"]
    assert services.keys() >= COMPOSE_SERVICES
    for name in COMPOSE_SERVICES - {"minio"}:
        assert services[name]["image"] == services["prefect-worker"]["image"], name


def test_compose_ray_worker_reserves_an_nvidia_gpu() -> None:
    devices = _compose()["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert [d["driver"] for d in devices] == ["nvidia"]
    assert "gpu" in devices[0]["capabilities"]
    assert "--num-gpus=0" in _compose()["services"]["ray-head"]["command"]
    assert "deploy" not in _compose()["services"]["ray-head"]


def test_compose_worker_polls_the_wanfactory_process_pool() -> None:
    command = _compose()["services"]["prefect-worker"]["command"]
    assert command[command.index("--pool") + 1] == "wanfactory"
    assert command[command.index("--type") + 1] == "process"
    k8s_command = _containers(_one("Deployment", "prefect-worker")["spec"]["template"]["spec"])[0]["command"]
    assert k8s_command[k8s_command.index("--pool") + 1] == "wanfactory"


# --- runs whose driver died -----------------------------------------------------------------------


def test_worker_runs_send_heartbeats_and_the_zombie_automation_is_applied() -> None:
    """prefect.yaml gives the worker's runs the heartbeat `wanfactory serve` gives its own (the settings'
    default), and compose and Kubernetes apply the automation that marks a silent run Crashed."""
    pool = yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["work_pool"]
    assert pool["job_variables"]["env"] == Settings(_env_file=None).prefect_environment()
    apply = ["wanfactory", "automations", "apply"]
    services = _compose()["services"]
    assert services["prefect-automations"]["command"] == apply
    assert services["prefect-worker"]["depends_on"]["prefect-automations"] == {
        "condition": "service_completed_successfully"
    }
    job = _one("Job", "prefect-automations")["spec"]["template"]["spec"]
    assert [c["command"] for c in _containers(job)] == [apply]


def test_the_alert_webhook_url_reaches_automations_apply_only_from_secrets() -> None:
    """The alerts' webhook URL (a credential: Slack's and Teams' carry their token) goes to the one process
    that writes it into Prefect's notification block, from infra/.env or a Secret, and is optional."""
    name = "WANFACTORY_ALERT_WEBHOOK_URL"
    assert name in SECRET_SETTING_VARS
    services = _compose()["services"]
    assert _compose_env("prefect-automations")[name] == f"${{{name}:-}}"
    assert [service for service in services if name in _compose_env(service)] == ["prefect-automations"]
    job = _containers(_one("Job", "prefect-automations")["spec"]["template"]["spec"])[0]
    assert {"name": "wanfactory-alerts", "optional": True} in [e.get("secretRef") for e in job["envFrom"]]
    assert name in _one("Secret", "wanfactory-alerts")["stringData"] and name not in _config()
    assert "WANFACTORY_ALERT_INFRA_FAILURE_SHARE" in _config()  # read where the runs run: the worker


METRICS_PORT = 8080
RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"  # where a Ray head's dashboard writes it
GRAFANA = INFRA / "grafana"


def _compose_metrics_port(service: str) -> int | None:
    command = _compose()["services"][service]["command"]
    found = re.findall(
        r"--metrics-export-port=(\d+)", command if isinstance(command, str) else " ".join(command)
    )
    return int(found[0]) if found else None


def test_every_ray_node_exports_metrics_on_the_port_prometheus_scrapes() -> None:
    """Compose: the head and worker serve metrics on one fixed port; Prometheus reads the head's service
    discovery file from the volume the head writes it to. Kubernetes: every Ray pod names that port
    "metrics", the port Prometheus's pod discovery keeps."""
    assert _compose_metrics_port("ray-head") == _compose_metrics_port("ray-worker") == METRICS_PORT
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    (ray_job,) = config["scrape_configs"]
    assert [f for sd in ray_job["file_sd_configs"] for f in sd["files"]] == [RAY_SD_FILE]
    services = _compose()["services"]
    sd_dir = str(Path(RAY_SD_FILE).parent)
    head_volume = next(v.split(":")[0] for v in services["ray-head"]["volumes"] if v.split(":")[1] == sd_dir)
    assert f"{head_volume}:{sd_dir}:ro" in services["prometheus"]["volumes"]
    assert (
        "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    )

    spec = _raycluster()["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == str(METRICS_PORT)
        (ray_container,) = [c for c in _containers(group["template"]["spec"]) if c["name"].startswith("ray-")]
        assert {"containerPort": METRICS_PORT, "name": "metrics"} in ray_container["ports"]
    k8s_config = yaml.safe_load(_one("ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    relabels = k8s_config["scrape_configs"][0]["relabel_configs"]
    assert {
        "source_labels": ["__meta_kubernetes_pod_container_port_name"],
        "regex": "metrics",
        "action": "keep",
    } in relabels
    assert _one("Deployment", "prometheus")["spec"]["template"]["spec"]["serviceAccountName"] == "prometheus"


def test_grafana_loads_the_dashboard_from_the_prometheus_it_names() -> None:
    dashboard = json.loads((GRAFANA / "wanfactory.json").read_text())
    uids = {target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel["targets"]}
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert uids == {datasource["uid"]} and datasource["type"] == "prometheus"
    # Compose names the service prometheus, and so does Kubernetes: one datasource file serves both.
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in _compose()["services"]
    assert _one("Service", "prometheus")["spec"]["ports"][0]["port"] == 9090
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "wanfactory.yml").read_text())
    dashboards_dir = providers["providers"][0]["options"]["path"]
    volumes = _compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/wanfactory.json:{dashboards_dir}/wanfactory.json:ro" in volumes
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    grafana = _containers(_one("Deployment", "grafana")["spec"]["template"]["spec"])[0]
    assert {"name": "dashboards", "mountPath": dashboards_dir} in grafana["volumeMounts"]
