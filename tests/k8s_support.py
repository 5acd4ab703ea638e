"""What the Kubernetes manifest tests share: the overlays as kustomize builds them, strict schema
validation, and how KubeRay turns a group spec into the ``ray start`` flags of its pods.

Schemas: Kubernetes v1.32 (strict: unknown fields are errors) vendored in k8s/schemas/, and the KubeRay
CRDs (RayService, RayCluster) of each version in KUBERAY_VERSIONS, read from ``<repo>/../shared/schemas/
kuberay-<version>/`` or from ``$KUBERAY_SCHEMAS_DIR/kuberay-<version>/``. They are not copied into the
repository; a missing CRD file is an error that names where it was looked for, never a skip.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from ray.autoscaler._private.kuberay.utils import parse_quantity

from cluster.ops import render

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob(f"*/{render.SETTINGS_FILE}"))
KUBERAY_VERSIONS = ["v1.7.0", "v1.5.1"]  # the release the docs install, then the oldest one checked
SCHEMAS_ENV = "KUBERAY_SCHEMAS_DIR"
META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def schemas_dir() -> Path:
    """The folder that holds ``kuberay-<version>/``: $KUBERAY_SCHEMAS_DIR, else shared/schemas beside the checkout."""
    return Path(os.environ.get(SCHEMAS_ENV) or ROOT.parent / "shared" / "schemas")


def crd_schema(version: str, kind: str, base: Path | None = None) -> dict:
    """The ``v1`` openAPIV3Schema of a KubeRay CRD; FileNotFoundError naming the path when it is missing."""
    path = (base or schemas_dir()) / f"kuberay-{version}" / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"KubeRay {version} CRD not found at {path} (set {SCHEMAS_ENV} to the folder holding kuberay-{version}/)"
        )
    crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def strict(schema: dict) -> dict:
    """A CRD schema that rejects unknown fields, as the API server does under kubectl's default
    (strict) field validation; objects marked x-kubernetes-preserve-unknown-fields stay open."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    return out


@functools.cache
def validator(kind: str, kuberay: str | None = None) -> Draft202012Validator:
    """Validator of a core kind (or a core definition's name), or of a KubeRay custom resource of one version."""
    if kind in ("RayService", "RayCluster"):
        return Draft202012Validator(strict(crd_schema(kuberay, kind)))
    bundle = json.loads((K8S / "schemas" / "kubernetes-v1.32.0-strict.json").read_text())
    schema = bundle["kinds"].get(kind, {"$ref": f"#/$defs/{kind}"})
    return Draft202012Validator({**schema, "$defs": bundle["$defs"]})


def schema_errors(doc: dict, kuberay: str = KUBERAY_VERSIONS[0]) -> list[str]:
    """Every schema violation of one manifest, as 'Kind/name path: message' (custom resources: of that KubeRay)."""
    kind = doc["kind"]
    checks = [(kind, doc)]
    if kind in ("RayService", "RayCluster"):  # the CRD leaves metadata open; the API server checks it
        checks.append((META, doc["metadata"]))
    if kind == "RayService" and "rayClusterConfig" in doc["spec"]:  # KubeRay makes a RayCluster of this spec
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": doc["metadata"]}
        checks.append(("RayCluster", {**cluster, "spec": doc["spec"]["rayClusterConfig"]}))
    name = doc["metadata"].get("name")
    custom = ("RayService", "RayCluster")
    return [
        f"{schema.rsplit('.', 1)[-1]}/{name} {'/'.join(map(str, err.absolute_path))}: {err.message}"
        for schema, obj in checks
        for err in validator(schema, kuberay if schema in custom else None).iter_errors(obj)
    ]


def kustomize_build(path: Path) -> list[dict]:
    """The documents of ``kustomize build path`` (the kustomize binary, else the one kubectl embeds)."""
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    else:
        raise RuntimeError("neither kustomize nor kubectl (which embeds kustomize) is on PATH: install one")
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def ray_service(docs: list[dict]) -> dict:
    (service,) = by_kind(docs, "RayService")
    return service


def groups(service: dict) -> dict[str, dict]:
    """The RayCluster's groups by name; the head group as 'head'."""
    cluster = service["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def ray_containers(service: dict) -> list[dict]:
    return [g["template"]["spec"]["containers"][0] for g in groups(service).values()]


class KubeRayRefused(ValueError):
    """KubeRay would refuse or misread the group: its validation error, or the error it logs."""


def kuberay_ray_start(group: dict) -> dict[str, str]:
    """The ``ray start`` flags KubeRay 1.5.1 / 1.7.0 give a group's pods, from its group-level ``resources``,
    ``rayStartParams`` and the Ray container's limits (ray-operator/controllers/ray/utils/validation.go:
    validateRayGroupResources; common/pod.go: updateRayStartParamsResources, generateRayStartCommand,
    addWellKnownAcceleratorResources, getResourcesMap). ``resources`` comes back as the JSON object it holds."""
    params = dict(group.get("rayStartParams") or {})
    resources = group.get("resources") or {}
    if resources and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
        raise KubeRayRefused("resource fields should not be set in both rayStartParams and Resources")
    custom: dict[str, float] = {}
    for name, quantity in resources.items():
        amount = parse_quantity(quantity)
        flag = {"cpu": "num-cpus", "memory": "memory"}.get(name.lower())
        if flag is None and name.lower().endswith("gpu"):
            flag = "num-gpus"
        if flag:
            params[flag] = str(int(amount.to_integral_value(rounding="ROUND_UP")))
        else:
            custom[name] = float(amount)
    if custom:
        params["resources"] = "'" + json.dumps(custom) + "'"
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(int(parse_quantity(limits["cpu"]).to_integral_value(rounding="ROUND_UP")))
    if "memory" not in params and "memory" in limits:
        params["memory"] = str(int(parse_quantity(limits["memory"])))
    try:  # Go's strings.Trim(s, "'\"` ") then json.Unmarshal into map[string]float64
        parsed = json.loads(params.get("resources", "{}").strip("'\"` "))
        if not isinstance(parsed, dict) or not all(isinstance(v, int | float) for v in parsed.values()):
            raise ValueError("not a map of numbers")
    except ValueError as exc:
        raise KubeRayRefused(f"failed to add accelerator resources to rayStartParams: {exc}") from exc
    if "num-gpus" not in params:
        gpu = next((q for k, q in sorted(limits.items()) if k.endswith("gpu") and parse_quantity(q) != 0), None)
        if gpu is not None:
            params["num-gpus"] = str(int(parse_quantity(gpu)))
    if "resources" in params:
        params["resources"] = parsed
    return params


def quantity(value: str) -> Decimal:
    return parse_quantity(value)
