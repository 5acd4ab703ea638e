"""What KubeRay (1.5.1 to 1.7.0) and Ray make of the rendered manifests, beyond their schema: where the
replicas may land, the ``ray start`` flags KubeRay derives for each group (tests/k8s_support.py follows
its Go code), the model cache, probes, the upgrade strategy, Redis's Services, the worker groups'
replicas, the KubeRay version the docs install, and a Serve config check that refuses unknown keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from k8s_support import (
    KUBERAY_VERSIONS,
    OVERLAYS,
    ROOT,
    KubeRayRefused,
    by_kind,
    groups,
    kuberay_ray_start,
    kustomize_build,
    quantity,
    ray_containers,
    ray_service,
    schema_errors,
)
from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec
from ray.serve.schema import ServeDeploySchema

from cluster.config import load_config
from cluster.ops import render
from cluster.ops.serve_check import serve_config_errors

HF_CACHE_SUFFIX = ".cache/huggingface"
UNIFIED_HEALTH_RAY = (2, 53)  # KubeRay 1.6+ probes Ray 2.53+ through the node's /api/healthz


@pytest.fixture(scope="module", params=OVERLAYS, ids=[p.name for p in OVERLAYS])
def overlay(request) -> tuple[Path, list[dict]]:
    return request.param, kustomize_build(request.param)


def serve_deployments(service: dict) -> dict[str, dict]:
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return {d["name"]: d for d in app["deployments"]}


def demand(deployment: dict) -> dict[str, float]:
    """A replica's Ray demand: CPUs (Ray's default 1), GPUs and custom resources."""
    options = deployment.get("ray_actor_options", {})
    wanted = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    return {name: amount for name, amount in wanted.items() if amount}


def fits(wanted: dict[str, float], pod: dict[str, float]) -> bool:
    return all(pod.get(name, 0) >= amount for name, amount in wanted.items())


def autoscaler_view(service: dict) -> dict[str, dict]:
    """Each group's Ray resources per pod as the Ray autoscaler reads them."""
    return {name: _get_ray_resources_from_group_spec(g, is_head=name == "head") for name, g in groups(service).items()}


def test_no_replica_lands_on_the_head_and_routers_spread_over_worker_pods(overlay):
    """The head takes no replica (KubeRay starts it with 0 CPUs), so a lost head keeps the routers; each
    Router replica goes to its own worker pod, and there are pods enough for all of them."""
    path, docs = overlay
    cfg = render.load_overlay(path)[1]
    service = ray_service(docs)
    assert kuberay_ray_start(groups(service)["head"])["num-cpus"] == "0"
    assert service["spec"].get("excludeHeadPodFromServeSvc") is True  # no client connection goes through the head
    pods = autoscaler_view(service)
    deployments = serve_deployments(service)
    assert [name for name, d in deployments.items() if fits(demand(d), pods["head"])] == []
    router = deployments["Router"]
    assert router.get("max_replicas_per_node") == 1
    hosts = [g for name, g in groups(service).items() if name != "head" and fits(demand(router), pods[name])]
    assert sum(g["minReplicas"] for g in hosts) >= cfg.router.num_replicas


def test_kuberay_reads_each_groups_ray_resources_as_the_autoscaler_does(overlay):
    """KubeRay accepts every group's resources and starts its pods with the CPUs, GPUs and custom resources
    (the pool's node resource, the accelerator type) that the Ray autoscaler plans with."""
    path, docs = overlay
    cfg = render.load_overlay(path)[1]
    service = ray_service(docs)
    pods = autoscaler_view(service)
    for name, group in groups(service).items():
        flags = kuberay_ray_start(group)
        started = {"CPU": int(flags["num-cpus"]), **flags.get("resources", {})}
        if "num-gpus" in flags:
            started["GPU"] = int(flags["num-gpus"])
        planned = {k: v for k, v in pods[name].items() if k != "memory"}
        assert {k: v for k, v in started.items() if v} == {k: v for k, v in planned.items() if v}, name
    for role, pool in cfg.pools.items():
        group = groups(service)[f"{role}-pool"]
        flags = kuberay_ray_start(group)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert flags["num-gpus"] == limits[render.GPU]
        assert flags["resources"][pool.placement.node_resource] >= 1
        if pool.placement.accelerator_type:
            assert flags["resources"][f"accelerator_type:{pool.placement.accelerator_type}"] >= 1


def test_head_advertises_no_gpus(overlay):
    """Ray on the head sees 0 GPUs whatever node it lands on (not only because taints keep it off GPU nodes)."""
    service = ray_service(overlay[1])
    assert kuberay_ray_start(groups(service)["head"])["num-gpus"] == "0"
    assert autoscaler_view(service)["head"].get("GPU", 0) == 0


def test_model_cache_is_sized_and_requested(overlay):
    """The Hugging Face cache of every GPU pod is a volume of bounded size that the pod requests as
    ephemeral storage (or a persistent volume claim), so the scheduler counts the weights' disk."""
    service = ray_service(overlay[1])
    gpu_groups = [
        g
        for name, g in groups(service).items()
        if name != "head" and render.GPU in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups
    for group in gpu_groups:
        spec = group["template"]["spec"]
        container = spec["containers"][0]
        (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"].endswith(HF_CACHE_SUFFIX)]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests["ephemeral-storage"] == limits["ephemeral-storage"]
        if "persistentVolumeClaim" in volume:  # a shared claim that already holds the weights
            assert {e["name"]: e.get("value") for e in container["env"]}["HF_HUB_OFFLINE"] == "1"
            continue
        size = quantity(volume["emptyDir"]["sizeLimit"])
        assert volume["emptyDir"].get("medium") != "Memory"
        assert quantity(requests["ephemeral-storage"]) > size, group["groupName"]


def test_a_shared_cache_claim_replaces_the_node_cache():
    """With cache_claim, the pool's pods mount that claim, read the weights offline and request no disk for
    them; the other pool keeps its sized cache; the RayService still validates against each CRD."""
    overlay = ROOT / "k8s" / "overlays" / "production"
    settings, cfg = render.load_overlay(overlay)
    settings.large = settings.large.model_copy(update={"cache_gib": None, "cache_claim": "models-large"})
    service = render.rayservice(cfg, settings)
    for kuberay in KUBERAY_VERSIONS:
        assert schema_errors(service, kuberay) == []
    large, small = groups(service)["large-pool"], groups(service)["small-pool"]
    volumes = {v["name"]: v for v in large["template"]["spec"]["volumes"]}
    assert volumes["model-cache"] == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "models-large"}}
    container = large["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}["HF_HUB_OFFLINE"] == "1"
    assert container["resources"]["requests"]["ephemeral-storage"] == f"{render.SCRATCH_GIB}Gi"
    small_env = {e["name"]: e.get("value") for e in small["template"]["spec"]["containers"][0]["env"]}
    assert small_env["HF_HUB_OFFLINE"] == "0"
    with pytest.raises(ValueError, match="exactly one of cache_gib"):
        render.WorkerGroupSettings(node_pool="p", memory_gib=8, shm_gib=1, cache_gib=8, cache_claim="c")
    with pytest.raises(ValueError, match="exactly one of cache_gib"):
        render.WorkerGroupSettings(node_pool="p", memory_gib=8, shm_gib=1)


def test_probes_are_kuberays_own_for_the_ray_version(overlay):
    """No Ray container carries a hand-written probe: KubeRay injects its own, which for Ray 2.53+ check
    the node's /api/healthz; the Ray version is one of those and is the image's."""
    service = ray_service(overlay[1])
    for container in ray_containers(service):
        assert "livenessProbe" not in container and "readinessProbe" not in container, container["name"]
    version = service["spec"]["rayClusterConfig"]["rayVersion"]
    assert tuple(int(x) for x in version.split(".")[:2]) >= UNIFIED_HEALTH_RAY
    dockerfile = (ROOT / "k8s" / "image" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray-llm:{re.escape(version)}-", dockerfile, re.MULTILINE)
    assert all(c["image"] == ray_containers(service)[0]["image"] for c in ray_containers(service))


def test_upgrade_strategy_is_chosen(overlay):
    """The RayService names its upgrade strategy (the overlay's choice), one that KubeRay accepts without a
    feature gate: None, or NewCluster where a second set of GPU pods fits."""
    path, docs = overlay
    strategy = ray_service(docs)["spec"]["upgradeStrategy"]
    assert set(strategy) == {"type"} and strategy["type"] in ("None", "NewCluster")
    assert strategy["type"] == yaml.safe_load((path / render.SETTINGS_FILE).read_text())["upgrade_strategy"]


def test_redis_governing_service_is_headless(overlay):
    (redis,) = by_kind(overlay[1], "StatefulSet")
    (governing,) = [s for s in by_kind(overlay[1], "Service") if s["metadata"]["name"] == redis["spec"]["serviceName"]]
    assert governing["spec"].get("clusterIP") == "None"
    labels = redis["spec"]["template"]["metadata"]["labels"]
    assert governing["spec"]["selector"].items() <= labels.items()


def test_worker_groups_set_replicas_within_their_bounds(overlay):
    for group in ray_service(overlay[1])["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", -1) <= group["maxReplicas"], group["groupName"]


def test_docs_install_the_kuberay_release_the_crds_are_checked_against():
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    installed = re.findall(r"helm install kuberay-operator kuberay/kuberay-operator --version (\S+)", doc)
    assert installed == [KUBERAY_VERSIONS[0].lstrip("v")]


def test_serve_config_check_refuses_unknown_keys():
    """A typo in a deployment option passes Ray Serve's own schema but not the project's check."""
    config = render.serve_config(load_config("gpu-example"))
    assert serve_config_errors(config) == []
    small = config["applications"][0]["deployments"][0]
    small["max_ongoing_requestz"] = small.pop("max_ongoing_requests")
    config["applications"][0]["deployments"][2]["ray_actor_options"]["num_cpu"] = 1
    small["autoscaling_config"]["target_ongoing_request"] = 4
    ServeDeploySchema.model_validate(config)  # Ray Serve reads it, with the default max_ongoing_requests
    errors = "\n".join(serve_config_errors(config))
    assert "deployments[SmallPool].max_ongoing_requestz: unknown key for DeploymentSchema" in errors
    assert "deployments[Router].ray_actor_options.num_cpu: unknown key for RayActorOptionsSchema" in errors
    assert "deployments[SmallPool].autoscaling_config.target_ongoing_request: unknown key" in errors
    assert len(serve_config_errors(config)) == 3


def test_rendered_serve_configs_have_no_unknown_keys(overlay):
    assert serve_config_errors(yaml.safe_load(ray_service(overlay[1])["spec"]["serveConfigV2"])) == []


def _group(params: dict | None = None, resources: dict | None = None, limits: dict | None = None) -> dict:
    group = {
        "rayStartParams": params or {},
        "template": {"spec": {"containers": [{"resources": {"limits": limits or {}}}]}},
    }
    return group | ({"resources": resources} if resources else {})


@pytest.mark.parametrize(
    ("group", "flags"),
    [  # cases of KubeRay v1.7.0's TestUpdateRayStartParamsResources and TestGenerateRayStartCommand (pod_test.go)
        (_group(resources={"cpu": "2", "memory": "4Gi"}), {"num-cpus": "2", "memory": "4294967296"}),
        (_group(resources={"CPU": "2", "GPU": "4"}), {"num-cpus": "2", "num-gpus": "4"}),
        (_group(resources={"nvidia.com/gpu": "1", "TPU": "4"}), {"num-gpus": "1", "resources": {"TPU": 4}}),
        (_group(limits={"nvidia.com/gpu": "1"}), {"num-gpus": "1"}),
        (_group({"resources": '"{"custom_resource":2}"'}), {"resources": {"custom_resource": 2}}),
    ],
)
def test_the_kuberay_model_follows_kuberays_own_cases(group, flags):
    assert kuberay_ray_start(group) == flags


def test_the_kuberay_model_refuses_what_kuberay_refuses():
    with pytest.raises(KubeRayRefused, match="failed to add accelerator resources"):
        kuberay_ray_start(_group({"resources": "{"}, limits={"nvidia.com/gpu": "1"}))
    with pytest.raises(KubeRayRefused, match="failed to add accelerator resources"):  # the escaped form
        kuberay_ray_start(_group({"resources": '"{\\"small_pool\\": 1}"'}, limits={"nvidia.com/gpu": "1"}))
    with pytest.raises(KubeRayRefused, match="both rayStartParams and Resources"):
        kuberay_ray_start(_group({"num-cpus": "1"}, resources={"CPU": "4"}))
