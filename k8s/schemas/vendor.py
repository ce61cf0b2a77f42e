"""Writes the JSON schemas tests/test_configs.py validates k8s/*.yaml against, offline:

- ``kubernetes-<version>-strict.json``: the Kubernetes API schemas of the kinds the manifests
  use, from the ``-local-strict`` schemas the ``kubernetes-validate`` wheel ships (the
  kubernetes-json-schema layout: every object ``additionalProperties: false``), reduced to the
  definitions those kinds reach;
- ``kuberay-<version>-rayservice.json``: the ``openAPIV3Schema`` of the ray.io/v1 RayService in
  KubeRay's CRD (ray-operator/config/crd/bases/ray.io_rayservices.yaml), made strict the way the
  API server's field validation is: an object that lists its properties takes no other field
  (the server drops or, with ``--validate=strict``, refuses unknown ones).

Descriptions and whitespace are dropped to keep the files small. Rerun it for other versions:

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    unzip -q /tmp/kv/*.whl -d /tmp/kv
    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayservices.yaml > /tmp/rs.yaml
    python k8s/schemas/vendor.py --kubernetes /tmp/kv/kubernetes_validate/kubernetes-json-schema \
        --kubernetes-version v1.34.0 --rayservice-crd /tmp/rs.yaml --kuberay-version v1.7.0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
# apiVersion/kind -> the file of kubernetes-json-schema; only the kinds k8s/*.yaml use.
KINDS = {
    "v1/Service": "service-v1.json",
    "v1/Secret": "secret-v1.json",
    "apps/v1/StatefulSet": "statefulset-apps-v1.json",
    "networking.k8s.io/v1/Ingress": "ingress-networking-v1.json",
}
SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
SCHEMA_MAPS = ("properties", "$defs", "patternProperties")


def strip(node):
    """``node`` (a schema) without descriptions; a property named ``description`` stays."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description" and isinstance(value, str):
            continue
        if key in SCHEMA_MAPS:
            out[key] = {name: strip(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS:
            out[key] = [strip(sub) for sub in value]
        elif key in ("items", "additionalProperties", "not"):
            out[key] = strip(value)
        else:
            out[key] = value
    return out


def refs(node) -> set[str]:
    found = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(value.rsplit("/", 1)[1])
            else:
                found |= refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= refs(value)
    return found


def local_refs(node):
    if isinstance(node, dict):
        return {k: (f"#/$defs/{v.rsplit('/', 1)[1]}" if k == "$ref" and isinstance(v, str)
                    else local_refs(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [local_refs(v) for v in node]
    return node


def kubernetes_bundle(root: Path, version: str) -> dict:
    folder = root / f"{version}-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())["$defs"]
    bundle: dict = {}
    todo: list[str] = []
    for kind, name in KINDS.items():
        schema = strip(json.loads((folder / name).read_text()))
        for key in ("$schema", "$id", "x-kubernetes-group-version-kind"):
            schema.pop(key, None)
        bundle[kind] = local_refs(schema)
        todo += refs(schema)
    while todo:
        name = todo.pop()
        if name in bundle:
            continue
        bundle[name] = local_refs(strip(definitions[name]))
        todo += refs(definitions[name])
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"Kubernetes {version} API, strict: k8s/schemas/vendor.py",
            "$defs": dict(sorted(bundle.items()))}


def strict(node):
    """Objects that list their properties take no other field, as the API server validates
    a custom resource (unless the schema keeps unknown fields)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in SCHEMA_MAPS:
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS:
            out[key] = [strict(sub) for sub in value]
        elif key in ("items", "additionalProperties", "not"):
            out[key] = strict(value)
        else:
            out[key] = value
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def rayservice_schema(crd_path: Path, version: str) -> dict:
    crd = yaml.safe_load(crd_path.read_text())
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(strip(served["schema"]["openAPIV3Schema"]))
    schema.pop("status", None)
    schema["properties"].pop("status", None)  # written by the operator, never by us
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"KubeRay {version} ray.io/v1 RayService, strict: k8s/schemas/vendor.py",
            **schema}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes", type=Path, required=True)
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("--rayservice-crd", type=Path, required=True)
    parser.add_argument("--kuberay-version", required=True)
    args = parser.parse_args()
    for old in HERE.glob("*.json"):
        old.unlink()
    outputs = {
        f"kubernetes-{args.kubernetes_version}-strict.json":
            kubernetes_bundle(args.kubernetes, args.kubernetes_version),
        f"kuberay-{args.kuberay_version}-rayservice.json":
            rayservice_schema(args.rayservice_crd, args.kuberay_version),
    }
    for name, schema in outputs.items():
        (HERE / name).write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
