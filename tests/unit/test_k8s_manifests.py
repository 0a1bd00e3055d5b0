"""The Kubernetes manifests (deploy/k8s): every kustomization renders, and every object it renders is valid.

Built-in kinds are checked against the Kubernetes API's JSON schema (``kubernetes-validate``, strict: an
unknown field fails) for the oldest and newest minor versions the docs support. KEDA's kinds are custom
resources the package has no schema for: they are checked against the fields KEDA's CRDs require (and
against the CRDs' own openAPIV3Schema when ``AAS_KEDA_CRDS`` names a folder of KEDA's CRD files).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu"]
K8S_VERSIONS = ["1.28.0", "1.33.0"]  # docs/operations.md: "Kubernetes 1.28 or newer"
SECRET = "aas-secrets"
SECRET_KEYS = {"AAS_REDIS_PASSWORD", "AAS_S3_ACCESS_KEY", "AAS_S3_SECRET_KEY", "AAS_SIGNING_KEY",
               "AAS_REGISTRY_TOKEN", "AAS_FLOWER_USER", "AAS_FLOWER_PASSWORD"}

# What KEDA (v2, keda.sh/v1alpha1) requires of its two kinds used here, written from its CRDs' schemas.
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object", "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {"type": "object", "required": ["name"], "properties": {
                        "name": {"type": "string"}, "kind": {"type": "string"}, "apiVersion": {"type": "string"}},
                        "additionalProperties": False},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "advanced": {"type": "object"},
                    "triggers": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["type", "metadata"],
                        "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                       "metadata": _STR_MAP,
                                       "authenticationRef": {"type": "object", "required": ["name"]}},
                        "additionalProperties": False}},
                },
                "additionalProperties": False,
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {"type": "object", "properties": {"secretTargetRef": {"type": "array", "items": {
                "type": "object", "required": ["parameter", "name", "key"],
                "properties": {k: {"type": "string"} for k in ("parameter", "name", "key")},
                "additionalProperties": False}}}},
        },
    },
}


def missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


def render(path: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (client only is enough): cannot run `kubectl kustomize`")
    p = subprocess.run([kubectl, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"kubectl kustomize {path} failed:\n{p.stderr}"
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed (a test extra: pip install -e '.[test]')")
    return kubernetes_validate


def validate_keda(obj: dict[str, Any]) -> None:
    import jsonschema

    jsonschema.validate(obj, KEDA_SCHEMAS[obj["kind"]])
    crds = os.environ.get("AAS_KEDA_CRDS")
    if crds:
        plural = {"ScaledObject": "scaledobjects", "TriggerAuthentication": "triggerauthentications"}[obj["kind"]]
        crd = yaml.safe_load((Path(crds) / f"keda.sh_{plural}.yaml").read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        jsonschema.validate(obj, schema)


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_rendered_object_is_valid_against_the_kubernetes_api_schema(path: str) -> None:
    kv = validator()
    objs = render(path)
    assert objs
    for obj in objs:
        where = f"{path}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].startswith("keda.sh/"):
            validate_keda(obj)
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{where} is invalid for Kubernetes {version}: {e.message} at {list(e.path)}")
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "aas", f"{where}: not in namespace aas"


def test_the_schema_check_rejects_a_broken_object() -> None:
    kv = validator()
    deploy = next(o for o in render("base") if o["kind"] == "Deployment")
    broken = {**deploy, "spec": {**deploy["spec"], "replicas": "two"}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[-1], strict=True)
    typo = {**deploy, "spec": {**deploy["spec"], "replica": 2}}
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, K8S_VERSIONS[-1], strict=True)
    with pytest.raises(Exception, match="scaleTargetRef"):
        validate_keda({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
                       "spec": {"triggers": [{"type": "redis", "metadata": {}}]}})


def test_the_fleet_has_every_part_and_shard_workers_scale_on_the_shards_queue() -> None:
    from workers.app import QUEUE_SHARDS

    objs = render("overlays/gpu")
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    assert {"aggregator", "shard-worker", "shard-worker-gpu", "beat", "flower", "registry", "inference"} <= set(
        by_kind["Deployment"])
    assert {"redis", "minio"} <= set(by_kind["StatefulSet"])

    gpu = containers(by_kind["Deployment"]["shard-worker-gpu"])[0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--pool=solo" in gpu["command"]
    cpu = containers(by_kind["Deployment"]["shard-worker"])[0]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})

    auths = by_kind["TriggerAuthentication"]
    for name, target in (("shard-worker", "shard-worker"), ("shard-worker-gpu", "shard-worker-gpu")):
        so = by_kind["ScaledObject"][name]
        assert so["spec"]["scaleTargetRef"]["name"] == target and target in by_kind["Deployment"]
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == QUEUE_SHARDS
        assert trigger["metadata"]["address"].startswith("redis.aas.svc")
        auth = auths[trigger["authenticationRef"]["name"]]
        assert {(r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == {(SECRET, "AAS_REDIS_PASSWORD")}
        worker = containers(by_kind["Deployment"][target])[0]
        assert worker["command"][worker["command"].index("-Q") + 1] == QUEUE_SHARDS


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_credentials_come_only_from_the_secret_and_none_has_a_default(path: str) -> None:
    objs = render(path)
    assert not [o for o in objs if o["kind"] == "Secret"], "a Secret with values is in the manifests"
    referenced = set()
    for o in objs:
        for c in containers(o):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref["name"] == SECRET and not ref.get("optional", False), env
                    referenced.add(ref["key"])
                elif env["name"] in SECRET_KEYS or env["name"].startswith(("MINIO_ROOT", "REDIS_PASSWORD")):
                    pytest.fail(f"{o['metadata']['name']}: {env['name']} has a literal value, not a secretKeyRef")
                elif "value" in env and "@" in env["value"]:
                    assert "$(AAS_REDIS_PASSWORD)" in env["value"], f"{env['name']}: credentials in a URL"
            for src in c.get("envFrom", []):
                assert "secretRef" not in src or src["secretRef"]["name"] == SECRET
    for cm in (o for o in objs if o["kind"] == "ConfigMap"):
        for key in cm.get("data", {}):
            assert key not in SECRET_KEYS and not key.endswith(("_PASSWORD", "_TOKEN", "_SECRET_KEY")), key
    assert referenced <= SECRET_KEYS
    docs = (REPO / "docs" / "operations.md").read_text()
    assert all(k in docs for k in referenced), "docs/operations.md must say how to create every Secret key"


def test_overlays_point_the_aas_images_at_a_registry() -> None:
    for path in ("overlays/cpu", "overlays/gpu"):
        for o in render(path):
            for c in containers(o):
                assert not c["image"].startswith("aas"), f"{path}: {o['metadata']['name']} uses {c['image']}"
