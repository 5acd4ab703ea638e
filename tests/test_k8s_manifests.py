"""The Kubernetes manifests: each overlay builds with kustomize, validates strictly against the pinned
Kubernetes schemas and the KubeRay v1.7.0 and v1.5.1 CRDs (tests/k8s_support.py says where they are read
from; a missing one fails), and matches the config tree it is rendered from (no Ray cluster needed).
tests/test_k8s_kuberay.py checks what KubeRay and Ray make of the manifests.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from k8s_support import (
    K8S,
    KUBERAY_VERSIONS,
    OVERLAYS,
    ROOT,
    by_kind,
    crd_schema,
    kustomize_build,
    ray_containers,
    ray_service,
    schema_errors,
)
from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec
from ray.autoscaler._private.kuberay.utils import parse_quantity
from ray.serve.schema import ServeDeploySchema

from cluster import topology
from cluster.config import ClusterConfig, load_config
from cluster.ops import render
from cluster.ops.serve_check import serve_config_errors


@pytest.fixture(scope="module", params=OVERLAYS, ids=[p.name for p in OVERLAYS])
def overlay(request) -> tuple[Path, list[dict]]:
    """An overlay folder and the documents it builds to."""
    return request.param, kustomize_build(request.param)


def serve_app(service: dict) -> dict:
    """The one application of a RayService's serveConfigV2, checked by Ray Serve's own schema and for unknown keys."""
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config_errors(config) == []
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.model_dump(exclude_unset=True)["applications"]
    return app


def test_every_overlay_found():
    assert {p.name for p in OVERLAYS} == {"dev", "production"}


def test_core_manifests_validate(overlay):
    _, docs = overlay
    assert sorted(d["kind"] for d in docs) == ["Ingress", "RayService", "Service", "Service", "StatefulSet"]
    assert [e for d in docs if d["kind"] != "RayService" for e in schema_errors(d)] == []


def test_secret_template_validates():
    docs = list(yaml.safe_load_all((K8S / "secrets.template.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Secret", "Secret"]
    assert [e for d in docs for e in schema_errors(d)] == []


@pytest.mark.parametrize("kuberay", KUBERAY_VERSIONS)
def test_rayservice_validates_against_kuberay_crds(overlay, kuberay):
    """Strict validation of the built RayService (and the RayCluster KubeRay makes of it) against each CRD."""
    assert schema_errors(ray_service(overlay[1]), kuberay) == []


@pytest.mark.parametrize("kuberay", KUBERAY_VERSIONS)
def test_wrong_fields_fail_validation(overlay, kuberay):
    service = copy.deepcopy(ray_service(overlay[1]))
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")  # unknown field and missing required field
    group["resources"]["CPU"] = 4  # KubeRay wants strings
    group["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"  # inside the pod template
    errors = "\n".join(schema_errors(service, kuberay))
    assert "'maxReplicas' is a required property" in errors
    assert "'maxReplica' was unexpected" in errors
    assert "4 is not of type 'string'" in errors
    assert "'imagePullPolicyy' was unexpected" in errors


def test_broken_manifest_file_fails_validation(tmp_path):
    """A broken rayservice.yaml in a copy of the dev overlay, built by kustomize as the real ones are: a
    missing required field, an unknown field and a wrong type each fail against each KubeRay CRD."""
    shutil.copytree(K8S / "base", tmp_path / "base")
    overlay = tmp_path / "overlays" / "broken"
    shutil.copytree(K8S / "overlays" / "dev", overlay)
    text = (overlay / render.OUTPUT_FILE).read_text()
    broken = text.replace("      maxReplicas: ", "      maxReplica: ", 1)
    broken = broken.replace("    enableInTreeAutoscaling: true\n", "    enableInTreeAutoscaling: 'yes'\n", 1)
    assert broken.count("maxReplica: ") == 1 and "'yes'" in broken
    (overlay / render.OUTPUT_FILE).write_text(broken)
    service = ray_service(kustomize_build(overlay))
    for kuberay in KUBERAY_VERSIONS:
        errors = "\n".join(schema_errors(service, kuberay))
        assert "'maxReplicas' is a required property" in errors
        assert "'maxReplica' was unexpected" in errors
        assert "'yes' is not of type 'boolean'" in errors


def test_missing_crds_fail_naming_where_they_were_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/kuberay-v1.7.0/ray.io_rayservices.yaml"):
        crd_schema("v1.7.0", "RayService", base=tmp_path)


def test_wrong_core_fields_fail_validation(overlay):
    (redis,) = copy.deepcopy(by_kind(overlay[1], "StatefulSet"))
    redis["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    redis["spec"]["replicas"] = "1"
    errors = "\n".join(schema_errors(redis))
    assert "'imagePullPolicyy' was unexpected" in errors
    assert "'1' is not of type 'integer'" in errors


def test_generated_files_are_fresh(overlay):
    path, _ = overlay
    assert (path / render.OUTPUT_FILE).read_text() == render.render_overlay(path), (
        f"{path / render.OUTPUT_FILE} is stale: run `python -m cluster.ops.render k8s {path.relative_to(ROOT)}`"
    )


def test_serve_config_is_valid_and_carries_the_config_tree(overlay):
    path, docs = overlay
    app = serve_app(ray_service(docs))
    assert (app["import_path"], app["route_prefix"]) == (topology.BUILDER, "/")
    assert [d["name"] for d in app["deployments"]] == ["SmallPool", "LargePool", "Router"]
    assert ClusterConfig.model_validate(app["args"]["config"]) == render.load_overlay(path)[1]


@pytest.mark.parametrize("name", ["local", "gpu-example"])
def test_serve_config_of_shipped_configs(name):
    cfg = load_config(name)
    config = ServeDeploySchema.model_validate(render.serve_config(cfg))
    assert config.http_options.port == cfg.router.port
    deployments = {d.name: d for d in config.applications[0].deployments}
    assert deployments["LargePool"].ray_actor_options.num_gpus == cfg.pools.large.placement.num_gpus
    assert deployments["SmallPool"].autoscaling_config["max_replicas"] == cfg.pools.small.autoscaling.max_replicas
    assert deployments["Router"].num_replicas == cfg.router.num_replicas


def demands(service: dict) -> dict[str, dict[str, float]]:
    """Each deployment's Ray demand per replica, from the RayService's Serve config."""
    out = {}
    for deployment in serve_app(service)["deployments"]:
        options = deployment["ray_actor_options"]
        demand = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
        if "accelerator_type" in options:
            demand[f"accelerator_type:{options['accelerator_type']}"] = 0.001
        out[deployment["name"]] = {name: amount for name, amount in demand.items() if amount}
    return out


def fits(demand: dict[str, float], pod: dict[str, float]) -> bool:
    return all(pod.get(name, 0) >= amount for name, amount in demand.items())


def test_each_deployment_fits_its_own_group_only(overlay):
    """Each deployment's replica fits one pod of its own group and no pod of another group (the head included),
    read as the Ray autoscaler reads the groups; each group's bounds hold the deployment's replicas."""
    path, docs = overlay
    cfg = render.load_overlay(path)[1]
    service = ray_service(docs)
    cluster = service["spec"]["rayClusterConfig"]
    pods = {"head": _get_ray_resources_from_group_spec(cluster["headGroupSpec"], is_head=True)}
    pods |= {g["groupName"]: _get_ray_resources_from_group_spec(g, is_head=False) for g in cluster["workerGroupSpecs"]}
    home = {topology.DEPLOYMENT_NAMES[role]: f"{role}-pool" for role, _ in cfg.pools.items()} | {
        "Router": render.ROUTER_GROUP
    }
    bounds = {
        name: (pool.autoscaling.min_replicas, pool.autoscaling.max_replicas)
        for name, pool in zip(home, (p for _, p in cfg.pools.items()), strict=False)
    }
    bounds["Router"] = (cfg.router.num_replicas, cfg.router.num_replicas)
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for name, demand in demands(service).items():
        assert fits(demand, pods[home[name]]), (name, demand, pods[home[name]])
        assert [g for g, pod in pods.items() if g != home[name] and fits(demand, pod)] == [], name
        per_pod = min(int(pods[home[name]][r] // demand[r]) for r in ("CPU", "GPU") if r in demand)
        group = groups[home[name]]
        assert group["minReplicas"] * per_pod >= bounds[name][0] and group["maxReplicas"] * per_pod >= bounds[name][1]
    for role, pool in cfg.pools.items():
        group = groups[f"{role}-pool"]
        assert (
            pods[group["groupName"]]["GPU"] >= pool.engine.tensor_parallel_size
        )  # one pod per tensor-parallel replica
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits
        assert parse_quantity(limits["cpu"]) >= pods[group["groupName"]]["CPU"]
        assert parse_quantity(limits[render.GPU]) == pods[group["groupName"]]["GPU"]
        shm = next(v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert shm["medium"] == "Memory" and parse_quantity(shm["sizeLimit"]) < parse_quantity(limits["memory"])
        assert group["template"]["spec"]["nodeSelector"][render.NODE_POOL_LABEL]
    for name in ("head", render.ROUTER_GROUP):
        group = cluster["headGroupSpec"] if name == "head" else groups[name]
        assert render.GPU not in group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_references_resolve(overlay):
    """Names that tie the manifests together: API Service, Redis host, Secrets, probes and requests on Redis."""
    path, docs = overlay
    cfg = render.load_overlay(path)[1]
    service = ray_service(docs)
    spec = service["spec"]
    backend = by_kind(docs, "Ingress")[0]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": spec["serveService"]["metadata"]["name"], "port": {"name": "serve"}}
    head_ports = {p["name"]: p["containerPort"] for p in ray_containers(service)[0]["ports"]}
    assert head_ports["serve"] == cfg.router.port

    redis_host = urlparse(cfg.redis.url)
    (redis_svc,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == redis_host.hostname]
    assert redis_svc["spec"]["ports"][0]["port"] == (redis_host.port or 6379)
    assert (
        spec["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"] == redis_svc["metadata"]["name"] + ":6379"
    )
    for container in ray_containers(service):
        env = {e["name"]: e for e in container["env"]}
        assert urlparse(env["REDIS_URL"]["value"]).hostname == redis_host.hostname
        assert "GLIMP_ADMIN_KEY" in env and "HF_TOKEN" in env

    templates = yaml.safe_load_all((K8S / "secrets.template.yaml").read_text())
    secrets = {(s["metadata"]["name"], key) for s in templates for key in s["stringData"]}
    refs = {(r["name"], r["key"]) for r in _find(docs, "secretKeyRef")}
    assert refs and refs <= secrets, refs - secrets
    assert "CHANGE-ME" not in json.dumps(docs)  # placeholders stay in the template, out of the build
    redis_containers = [c for s in by_kind(docs, "StatefulSet") for c in s["spec"]["template"]["spec"]["containers"]]
    for container in redis_containers:
        assert container["readinessProbe"] and container["livenessProbe"] and container["resources"]["requests"]
    assert all(c["resources"]["requests"] for c in ray_containers(service))  # their probes: KubeRay's


def _find(node, key: str) -> list:
    """Every value stored under ``key`` anywhere in a JSON-like tree."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _find(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _find(v, key)]
    return []


def test_render_refuses_configs_that_cannot_run_in_pods():
    settings = render.load_overlay(K8S / "overlays" / "dev")[0]
    with pytest.raises(ValueError, match=r"redis\.url"):
        render.rayservice(load_config("local"), settings)
    cfg = load_config("gpu-example")
    with pytest.raises(ValueError, match=r"router\.host"):
        render.rayservice(
            cfg.model_copy(update={"router": cfg.router.model_copy(update={"host": "127.0.0.1"})}), settings
        )
    cfg.pools.large.placement.node_resource = "small_pool"
    with pytest.raises(ValueError, match="node_resource"):
        render.rayservice(cfg, settings)
    cfg.pools.large.placement.node_resource = render.ROUTER_RESOURCE
    with pytest.raises(ValueError, match="node_resource"):
        render.rayservice(cfg, settings)


def test_render_refuses_a_serve_config_with_unknown_keys(monkeypatch):
    settings, cfg = render.load_overlay(K8S / "overlays" / "dev")
    real = render.serve_config

    def with_typo(*args, **kwargs):
        config = real(*args, **kwargs)
        config["applications"][0]["deployments"][0]["max_ongoing_requestz"] = 8
        return config

    monkeypatch.setattr(render, "serve_config", with_typo)
    with pytest.raises(ValueError, match="max_ongoing_requestz: unknown key for DeploymentSchema"):
        render.rayservice(cfg, settings)


def test_cli(tmp_path, capsys):
    assert render.main(["serve", "--config", "gpu-example"]) == 0
    ServeDeploySchema.model_validate(yaml.safe_load(capsys.readouterr().out))
    overlay = tmp_path / "ov"
    shutil.copytree(K8S / "overlays" / "dev", overlay)
    (overlay / render.OUTPUT_FILE).unlink()
    assert render.main(["k8s", str(overlay)]) == 0
    assert (overlay / render.OUTPUT_FILE).read_text() == (K8S / "overlays" / "dev" / render.OUTPUT_FILE).read_text()
    (overlay / render.SETTINGS_FILE).write_text("config: glimprouter.yaml\nimage: x\nray_version: 2.60.0\n")
    assert render.main(["k8s", str(overlay)]) == 1
    assert "small: Field required" in capsys.readouterr().err
