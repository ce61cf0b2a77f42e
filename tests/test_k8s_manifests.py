"""k8s/*.yaml validated offline against the schemas vendored in k8s/schemas (KubeRay's RayService
CRD, the Kubernetes API in its strict form: an unknown field anywhere is an error), and the
production shape issue 16 asks of them: the Ray GCS and the sessions in Redis, Redis itself in the
manifests, a NewCluster upgrade, and a Gateway Service that cannot hold two clusters' pods."""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from atelier3d.config import AppConfig

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
SCHEMAS = K8S / "schemas"
KUBERAY_VERSION = "v1.7.0"
KUBERNETES_VERSION = "v1.34.0"
MANIFESTS = ["rayservice.yaml", "redis.yaml"]  # the Kubernetes objects (not the scrape config)
# KubeRay's RayServiceUpgradeType (ray-operator/apis/ray/v1/rayservice_types.go): the CRD types
# the field as a plain string, the operator rejects any other value.
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


@cache
def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


def pointer(key: str) -> str:
    return "#/$defs/" + key.replace("~", "~0").replace("/", "~1")


def kubernetes_validator(key: str) -> Draft202012Validator:
    return Draft202012Validator(
        schema(f"kubernetes-{KUBERNETES_VERSION}-strict.json") | {"$ref": pointer(key)})


def schema_errors(document: dict) -> list[str]:
    """Every way ``document`` breaks its kind's schema, as 'path: message'."""
    kind = f"{document.get('apiVersion')}/{document.get('kind')}"
    if kind == "ray.io/v1/RayService":
        checks = [(Draft202012Validator(schema(f"kuberay-{KUBERAY_VERSION}-rayservice.json")),
                   document),
                  # the CRD leaves the object's own metadata to the API server: ObjectMeta
                  (kubernetes_validator(OBJECT_META), document.get("metadata", {}))]
    else:
        bundle = schema(f"kubernetes-{KUBERNETES_VERSION}-strict.json")
        assert kind in bundle["$defs"], f"{kind}: no vendored schema (k8s/schemas/vendor.py)"
        checks = [(kubernetes_validator(kind), document)]
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
            for validator, value in checks for error in validator.iter_errors(value)]


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def by_kind(kind: str) -> list[dict]:
    return [d for name in MANIFESTS for d in documents(name) if d["kind"] == kind]


def rayservice() -> dict:
    [service] = by_kind("RayService")
    return service


def pod_templates() -> list[dict]:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    return [g["template"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


def gateway_template() -> dict:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    [group] = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gateway"]
    return group["template"]


def serve_args() -> dict:
    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    return embedded["applications"][0]["args"]


def env_secret(container: dict, name: str) -> tuple[str, str]:
    [env] = [e for e in container.get("env", []) if e["name"] == name]
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_validates_against_kuberay_and_kubernetes_schemas(name):
    docs = documents(name)
    assert docs
    for document in docs:
        assert not schema_errors(document), (document["kind"], schema_errors(document))


def test_every_kubernetes_object_in_k8s_is_validated():
    objects = {path.name for path in K8S.glob("*.yaml")
               if any(isinstance(d, dict) and {"apiVersion", "kind"} <= set(d)
                      for d in yaml.safe_load_all(path.read_text()))}
    assert objects == set(MANIFESTS)


def set_at(document: dict, path: list, key: str, value) -> dict:
    changed = copy.deepcopy(document)
    node = changed
    for step in path:
        node = node[step]
    node[key] = value
    return changed


RAY_GATEWAY = ["spec", "rayClusterConfig", "workerGroupSpecs", 0]


@pytest.mark.parametrize(("kind", "path", "key", "value"), [
    # misspelled fields, at every depth, in our own objects and in the Kubernetes types the CRD
    # embeds (pod template, Service)
    ("RayService", ["spec"], "upgradeStrategi", {"type": "NewCluster"}),
    ("RayService", ["spec", "upgradeStrategy"], "tpye", "NewCluster"),
    ("RayService", ["spec", "rayClusterConfig", "gcsFaultToleranceOptions"], "redisAdress",
     "atelier3d-redis:6379"),
    ("RayService", [*RAY_GATEWAY], "minReplica", 1),
    ("RayService", [*RAY_GATEWAY, "template", "spec", "containers", 0], "resouces", {}),
    ("RayService", ["spec", "serveService", "spec"], "sessionAfinity", "ClientIP"),
    ("RayService", ["metadata"], "label", {}),
    # rayStartParams is map[string]string: a YAML number is refused
    ("RayService", [*RAY_GATEWAY, "rayStartParams"], "num-cpus", 4),
    ("StatefulSet", ["spec", "template", "spec", "containers", 0], "volumeMount", []),
    ("Service", ["spec"], "selectr", {}),
    ("Secret", [], "strinData", {}),
    ("Ingress", ["spec", "rules", 0, "http", "paths", 0, "backend", "service"], "prot", {}),
])
def test_a_wrong_field_fails_validation(kind, path, key, value):
    document = by_kind(kind)[0]
    assert not schema_errors(document)
    errors = schema_errors(set_at(document, path, key, value))
    assert errors, (kind, path, key)
    assert any(key in e for e in errors), errors


def test_the_vendored_schemas_say_where_they_come_from():
    readme = (SCHEMAS / "README.md").read_text()
    for name in (f"kuberay-{KUBERAY_VERSION}-rayservice.json",
                 f"kubernetes-{KUBERNETES_VERSION}-strict.json"):
        assert name in readme
        assert (SCHEMAS / name).stat().st_size < 400_000  # only the kinds used
    assert f"KubeRay {KUBERAY_VERSION}" in (K8S / "rayservice.yaml").read_text()


def test_the_gcs_is_fault_tolerant_on_the_manifests_redis():
    ft = rayservice()["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    [redis_service] = [s for s in by_kind("Service") if s["metadata"]["name"] == "atelier3d-redis"]
    host, port = ft["redisAddress"].split(":")
    assert host == redis_service["metadata"]["name"]
    assert int(port) in {p["port"] for p in redis_service["spec"]["ports"]}
    # the Service reaches the Redis pods
    [redis] = by_kind("StatefulSet")
    assert redis_service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"][
        "labels"].items()
    # one password, from one Secret: KubeRay's head, the Redis server, the Gateways
    [secret] = by_kind("Secret")
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "password")
    assert "password" in secret["stringData"]
    [server] = redis["spec"]["template"]["spec"]["containers"]
    assert env_secret(server, "REDIS_PASSWORD") == (ref["name"], ref["key"])
    assert server["args"][server["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    # evicting GCS keys would lose the cluster's state; the data outlives the pod
    assert server["args"][server["args"].index("--maxmemory-policy") + 1] == "noeviction"
    assert redis["spec"]["volumeClaimTemplates"]


def test_the_gateways_keep_sessions_in_that_redis():
    sessions = serve_args()["sessions"]
    assert sessions["backend"] == "redis"
    url = re.fullmatch(r"redis://([^:/]+):(\d+)/(\d+)", sessions["redis_url"])
    assert url, sessions["redis_url"]
    ft = rayservice()["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert f"{url[1]}:{url[2]}" == ft["redisAddress"]
    assert int(url[3]) != 0  # Ray's GCS writes db 0
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    for container in gateway_template()["spec"]["containers"]:
        assert env_secret(container, sessions["redis_password_env"]) == (ref["name"], ref["key"])


def test_an_upgrade_starts_a_new_cluster_and_lets_the_old_ones_jobs_finish():
    spec = rayservice()["spec"]
    assert spec["upgradeStrategy"]["type"] in UPGRADE_TYPES
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    # KubeRay deletes the old cluster 60 s after the switch unless told otherwise: its Gateways'
    # running jobs (drained for up to jobs.drain_s) would die with it.
    [gateway] = [d for d in yaml.safe_load(spec["serveConfigV2"])["applications"][0][
        "deployments"] if d["name"] == "Gateway"]
    assert spec["rayClusterDeletionDelaySeconds"] >= gateway["graceful_shutdown_timeout_s"]
    assert gateway["graceful_shutdown_timeout_s"] > AppConfig.model_validate(
        serve_args()).jobs.drain_s


def test_no_service_can_select_pods_of_two_clusters():
    """KubeRay copies a group's template labels to the pods of every cluster it starts, the old
    and the new one alike during an upgrade: a Service selecting by those labels would hold both.
    Traffic goes through KubeRay's serve Service, whose selector is the active cluster's."""
    spec = rayservice()["spec"]
    for service in by_kind("Service"):
        selector = service["spec"].get("selector", {}).items()
        for template in pod_templates():
            assert not selector <= template["metadata"]["labels"].items(), (
                service["metadata"]["name"], selector)
    serve_service = spec["serveService"]
    assert "selector" not in serve_service["spec"]  # KubeRay replaces it: misleading if written
    assert spec["excludeHeadPodFromServeSvc"] is True  # no Gateway on the head (num-cpus 0)
    [ingress] = by_kind("Ingress")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"]["name"] == serve_service["metadata"]["name"]
    # KubeRay builds the serve Service's ports from the head's port named "serve"
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    serve_port = {p["name"]: p["containerPort"] for p in head["ports"]}["serve"]
    assert {p["name"]: p["port"] for p in serve_service["spec"]["ports"]}["serve"] == serve_port
