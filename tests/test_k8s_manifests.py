"""The Kubernetes manifests: each overlay builds with kustomize, validates against pinned schemas, and
matches the config tree it is rendered from (no Ray cluster needed).

Schemas: Kubernetes v1.32 (strict: unknown fields are errors) vendored in k8s/schemas/, and the KubeRay
v1.5.1 CRDs (RayService, RayCluster), read from $KUBERAY_CRD_DIR, k8s/schemas/kuberay-v1.5.1/ or, beside
the checkout, shared/schemas/kuberay-v1.5.1/; the CRD checks are skipped, saying so, where none exists.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from jsonschema import Draft202012Validator
from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec
from ray.autoscaler._private.kuberay.utils import parse_quantity
from ray.serve.schema import ServeDeploySchema

from cluster import topology
from cluster.ops import render
from cluster.config import ClusterConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob(f"*/{render.SETTINGS_FILE}"))
KUBERAY = "kuberay-v1.5.1"
CRD_DIRS = [Path(os.environ.get("KUBERAY_CRD_DIR", K8S / "schemas" / KUBERAY)), ROOT.parent / "shared" / "schemas" / KUBERAY]
CRD_DIR = next((d for d in CRD_DIRS if (d / "ray.io_rayservices.yaml").is_file()), None)
needs_crds = pytest.mark.skipif(CRD_DIR is None, reason=f"KubeRay {KUBERAY} CRDs in none of {CRD_DIRS}")
META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def _strict(schema: dict) -> dict:
    """A CRD schema that rejects unknown fields, as the API server does under kubectl's default
    (strict) field validation; objects marked x-kubernetes-preserve-unknown-fields stay open."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    return out


@functools.cache
def _validator(kind: str) -> Draft202012Validator:
    """Validator of a core kind (or a core definition's name) or of a KubeRay custom resource."""
    if kind in ("RayService", "RayCluster"):
        crd = yaml.load((CRD_DIR / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=yaml.CSafeLoader)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        return Draft202012Validator(_strict(version["schema"]["openAPIV3Schema"]))
    bundle = json.loads((K8S / "schemas" / "kubernetes-v1.32.0-strict.json").read_text())
    schema = bundle["kinds"].get(kind, {"$ref": f"#/$defs/{kind}"})
    return Draft202012Validator({**schema, "$defs": bundle["$defs"]})


def schema_errors(doc: dict) -> list[str]:
    """Every schema violation of one manifest, as 'Kind/name path: message'."""
    kind = doc["kind"]
    checks = [(kind, doc)]
    if kind in ("RayService", "RayCluster"):  # the CRD leaves metadata open; the API server checks it
        checks.append((META, doc["metadata"]))
    if kind == "RayService":  # KubeRay makes a RayCluster of this spec
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": doc["metadata"]}
        checks.append(("RayCluster", {**cluster, "spec": doc["spec"]["rayClusterConfig"]}))
    name = doc["metadata"].get("name")
    return [
        f"{schema.rsplit('.', 1)[-1]}/{name} {'/'.join(map(str, err.absolute_path))}: {err.message}"
        for schema, obj in checks
        for err in _validator(schema).iter_errors(obj)
    ]


def kustomize_build(path: Path) -> list[dict]:
    """The documents of ``kustomize build path`` (the kustomize binary, else the one kubectl embeds)."""
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    else:
        pytest.skip("neither kustomize nor kubectl (which embeds kustomize) is installed")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS, ids=[p.name for p in OVERLAYS])
def overlay(request) -> tuple[Path, list[dict]]:
    """An overlay folder and the documents it builds to."""
    return request.param, kustomize_build(request.param)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def ray_service(docs: list[dict]) -> dict:
    (service,) = by_kind(docs, "RayService")
    return service


def serve_app(service: dict) -> dict:
    """The one application of a RayService's serveConfigV2, checked by Ray Serve's own schema."""
    schema = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = schema.model_dump(exclude_unset=True)["applications"]
    return app


def ray_containers(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_overlay_found():
    assert {p.name for p in OVERLAYS} == {"dev", "production"}


def test_core_manifests_validate(overlay):
    _, docs = overlay
    assert {d["kind"] for d in docs} == {"RayService", "StatefulSet", "Service", "Ingress"}
    assert [e for d in docs if d["kind"] != "RayService" for e in schema_errors(d)] == []


def test_secret_template_validates():
    docs = list(yaml.safe_load_all((K8S / "secrets.template.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Secret", "Secret"]
    assert [e for d in docs for e in schema_errors(d)] == []


@needs_crds
def test_rayservice_validates_against_kuberay_crds(overlay):
    assert schema_errors(ray_service(overlay[1])) == []


@needs_crds
def test_wrong_fields_fail_validation(overlay):
    service = copy.deepcopy(ray_service(overlay[1]))
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")
    group["rayStartParams"]["num-cpus"] = 4  # KubeRay wants strings
    errors = "\n".join(schema_errors(service))
    assert "'maxReplicas' is a required property" in errors
    assert "'maxReplica' was unexpected" in errors
    assert "4 is not of type 'string'" in errors


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


def test_pool_replicas_fit_their_worker_pods(overlay):
    """Each pool's Ray demand per replica fits one pod of its group, read as the Ray autoscaler reads it."""
    path, docs = overlay
    cfg = render.load_overlay(path)[1]
    service = ray_service(docs)
    cluster = service["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    demands = {d["name"]: d for d in serve_app(service)["deployments"]}
    for role, pool in cfg.pools.items():
        group = groups[f"{role}-pool"]
        pod = _get_ray_resources_from_group_spec(group, is_head=False)
        options = demands[topology.DEPLOYMENT_NAMES[role]]["ray_actor_options"]
        demand = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options.get("resources", {})}
        if "accelerator_type" in options:
            demand[f"accelerator_type:{options['accelerator_type']}"] = 0.001
        assert all(pod.get(name, 0) >= amount for name, amount in demand.items()), (role, demand, pod)
        assert pod["GPU"] >= pool.engine.tensor_parallel_size  # a tensor-parallel replica stays on one pod
        per_pod = min(int(pod[r] // demand[r]) for r in ("CPU", "GPU") if demand[r])
        assert group["maxReplicas"] * per_pod >= pool.autoscaling.max_replicas
        assert group["minReplicas"] * per_pod >= pool.autoscaling.min_replicas
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits
        assert parse_quantity(limits["cpu"]) >= pod["CPU"]
        shm = next(v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert shm["medium"] == "Memory" and parse_quantity(shm["sizeLimit"]) < parse_quantity(limits["memory"])
        assert group["template"]["spec"]["nodeSelector"][render.NODE_POOL_LABEL]
    head = cluster["headGroupSpec"]
    assert _get_ray_resources_from_group_spec(head, is_head=True)["CPU"] >= cfg.router.num_replicas * cfg.router.num_cpus
    assert all(render.GPU not in c["resources"]["limits"] for c in head["template"]["spec"]["containers"])


def test_references_resolve(overlay):
    """Names that tie the manifests together: API Service, Redis host, Secrets, probes on every container."""
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
    assert spec["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"] == redis_svc["metadata"]["name"] + ":6379"
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
    for container in ray_containers(service) + redis_containers:
        assert container["readinessProbe"] and container["livenessProbe"] and container["resources"]["requests"]


def _find(node, key: str) -> list:
    """Every value stored under ``key`` anywhere in a JSON-like tree."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _find(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _find(v, key)]
    return []


def test_render_refuses_configs_that_cannot_run_in_pods():
    settings = render.load_overlay(K8S / "overlays" / "dev")[0]
    with pytest.raises(ValueError, match="redis.url"):
        render.rayservice(load_config("local"), settings)
    cfg = load_config("gpu-example")
    with pytest.raises(ValueError, match="router.host"):
        render.rayservice(cfg.model_copy(update={"router": cfg.router.model_copy(update={"host": "127.0.0.1"})}), settings)
    cfg.pools.large.placement.node_resource = "small_pool"
    with pytest.raises(ValueError, match="node_resource"):
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
