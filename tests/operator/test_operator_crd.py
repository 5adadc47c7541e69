"""The CRD: generated file in sync, a valid CRD for 1.30 and 1.33, bounded for CEL cost,
CEL rules accepting good specs and rejecting each bad one, examples admitted."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes_validate
import pytest
from ifo_schema import admit, cel_failures, rules, schema_errors
from ifo_support import K8S_VERSIONS, MANIFESTS, REPO, load_yaml_docs, make_isvc
from inferfleet.operator import crd


def test_checked_in_crd_matches_the_schema_source() -> None:
    path = REPO / "crds" / crd.CRD_FILENAME
    assert path.read_text() == crd.render_crd_yaml(), (
        "crds/ drifted from operator/crd.py: run `python -m inferfleet.operator.crd > crds/"
        + crd.CRD_FILENAME
        + "`"
    )
    assert load_yaml_docs(REPO / "crds" / "kustomization.yaml")[0]["resources"] == [crd.CRD_FILENAME]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_is_a_valid_custom_resource_definition(version: str) -> None:
    kubernetes_validate.validate(crd.crd(), version, strict=True)


def test_crd_contract() -> None:
    c = crd.crd()
    assert c["metadata"]["name"] == "inferenceservices.inferfleet.io"
    assert c["spec"]["scope"] == "Namespaced"
    assert c["spec"]["names"]["kind"] == "InferenceService"
    assert c["spec"]["names"]["shortNames"] == ["ifsvc"]
    (v,) = c["spec"]["versions"]
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    assert v["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    assert [col["name"] for col in v["additionalPrinterColumns"]] == [
        "Ready",
        "Replicas",
        "Warm",
        "Model",
        "Age",
    ]
    status = v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for field in (
        "observedGeneration",
        "replicas",
        "readyReplicas",
        "warmReplicas",
        "prepull",
        "balloons",
        "endpoint",
        "conditions",
        "autoscaler",
    ):
        assert field in status
    condition = status["conditions"]["items"]["properties"]
    assert {"type", "status", "reason", "lastTransitionTime"} <= set(condition)
    assert {"load", "desired", "reason", "time"} <= set(status["autoscaler"]["properties"])


def _walk(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), Mapping):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_every_number_string_and_list_is_bounded() -> None:
    """The API server estimates CEL cost from these bounds; unbounded ones fail the CRD."""
    for path, s in _walk(crd.openapi_schema()):
        if path == ".metadata" or s.get("x-kubernetes-preserve-unknown-fields"):
            continue
        if s.get("x-kubernetes-int-or-string"):  # structural without a type; its string form bounded
            assert s.get("anyOf") == [{"type": "integer"}, {"type": "string"}] and "maxLength" in s, path
            continue
        t = s.get("type")
        assert t, f"{path} has no type (not a structural schema)"
        if t in ("integer", "number"):
            assert "minimum" in s and "maximum" in s, path
        elif t == "string":
            assert "maxLength" in s or "enum" in s, path
        elif t == "array":
            assert "maxItems" in s, path
        elif t == "object" and "additionalProperties" in s:
            assert "maxProperties" in s, path


GOOD = [
    make_isvc(),
    make_isvc(replicas=3, minReplicas=2, maxReplicas=3, warmPool=3),
    make_isvc(minReplicas=0, replicas=0, warmPool=1, autoscaling={"enabled": True}),
    make_isvc(minReplicas=0, replicas=0, autoscaling={"enabled": False}),
    # replicas outside [minReplicas, maxReplicas]: Git lowering maxReplicas below what the autoscaler
    # reached, raising minReplicas above it, or minReplicas 2 with replicas left to its default
    make_isvc(replicas=9, maxReplicas=4),
    make_isvc(replicas=1, minReplicas=2, maxReplicas=4),
    make_isvc(minReplicas=2),
    # quantities as core Kubernetes takes them: unquoted integers too
    make_isvc(resources={"gpus": 0, "cpu": 8, "memory": "1.5Gi"}),
    make_isvc(model={"name": "m", "source": "pvc://models/llama/3.1-8b"}),
    make_isvc(model={"name": "m", "source": "pvc://models"}),
    make_isvc(model={"name": "m", "source": "oci://registry.example.com/models/llama:3.1@sha256:abc"}),
    make_isvc(model={"name": "meta-llama/Llama-3.1-8B", "source": "hf://meta-llama/Llama-3.1-8B-Instruct"}),
    make_isvc(engine={"quantization": "fp8", "extraArgs": ["--enforce-eager", "--seed=3"]}),
    make_isvc(resources={"gpus": 1}, engine={"kvCacheDtype": "fp8"}),
    # admitted by the API server (each field is valid alone); the operator reports InvalidSpec
    make_isvc(engine={"kvCacheDtype": "fp8"}),
    make_isvc(name="a" * crd.MAX_NAME_LENGTH),
]


@pytest.mark.parametrize("isvc", GOOD, ids=range(len(GOOD)))
def test_cel_accepts_good_specs(isvc: dict[str, Any]) -> None:
    _, errors = admit(isvc)
    assert errors == []


def _with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    obj = copy.deepcopy(base or make_isvc())
    *parents, last = path.split(".")
    target = obj
    for p in parents:
        target = target.setdefault(p, {})
    target[last] = value
    return obj


# (object, a substring of the CEL message it must trigger; each triggers only its own rule)
BAD_CEL = [
    (make_isvc(minReplicas=5, maxReplicas=4, replicas=5), "minReplicas (5) must not exceed maxReplicas (4)"),
    (make_isvc(warmPool=5, maxReplicas=4), "warmPool must not exceed maxReplicas"),
    (make_isvc(minReplicas=0, replicas=0, autoscaling={"enabled": True}), "needs warmPool >= 1"),
    (make_isvc(engine={"extraArgs": ["--port=9000"]}), "must not repeat a flag"),
    (make_isvc(engine={"extraArgs": ["--model", "/elsewhere"]}), "must not repeat a flag"),
    (make_isvc(engine={"extraArgs": ["--kv-cache-dtype=fp8"]}), "must not repeat a flag"),
    (make_isvc(name="a" * (crd.MAX_NAME_LENGTH + 1)), "at most 50 characters"),
]


@pytest.mark.parametrize(("isvc", "message"), BAD_CEL, ids=[m for _, m in BAD_CEL])
def test_cel_rejects_each_bad_spec(isvc: dict[str, Any], message: str) -> None:
    defaulted, schema_errs = admit(isvc)
    assert schema_errs and any(message in e for e in schema_errs), schema_errs
    failures = cel_failures(defaulted)
    assert len(failures) == 1, failures


def test_rules_on_metadata_are_constant_cost() -> None:
    """metadata.name has no maxLength in CEL's view (the API server declares it unbounded), so a
    regex or substring scan over it would exceed the per-rule cost budget and the API server
    would refuse the CRD. Only size() is used there."""
    for path, rule in rules(crd.openapi_schema()):
        if "metadata" in rule["rule"]:
            assert path == () and "matches(" not in rule["rule"] and "contains(" not in rule["rule"], rule
            assert rule["rule"].startswith("size(self.metadata.name)")


def test_cel_source_scheme_rule_alone() -> None:
    """The OpenAPI pattern also guards model.source; the CEL rule gives the readable message."""
    model_rules = [r for path, r in rules(crd.openapi_schema()) if path == ("spec", "model")]
    (rule,) = model_rules
    good = crd.apply_defaults(crd.openapi_schema(), make_isvc())
    assert cel_failures(good) == []
    bad = _with("spec.model.source", "s3://bucket/llama", good)
    assert cel_failures(bad) == [rule["message"]]


BAD_SCHEMA = [
    (_with("spec.model.source", "s3://bucket/model"), "spec.model.source"),
    (_with("spec.model.source", "tiny://gpt2"), "spec.model.source"),
    (_with("spec.engine", {"dtype": "int4"}), "spec.engine.dtype"),
    (_with("spec.engine", {"quantization": "awq"}), "spec.engine.quantization"),
    (_with("spec.engine", {"kvCacheDtype": "fp16"}), "spec.engine.kvCacheDtype"),
    (_with("spec.engine", {"gpuMemoryUtilization": 1.5}), "spec.engine.gpuMemoryUtilization"),
    (_with("spec.engine", {"extraArgs": ["--x"] * 33}), "spec.engine.extraArgs"),
    (_with("spec.resources", {"gpus": 17}), "spec.resources.gpus"),
    (_with("spec.resources", {"memory": "lots"}), "spec.resources.memory"),
    (_with("spec.engine", {"blockSize": 24}), "spec.engine.blockSize"),  # the worker takes powers of two
    (_with("spec.resources", {"cpu": 1.5}), "spec.resources.cpu"),  # a float: write "1500m" or "1.5"
    (_with("spec.resources", {"cpu": "8" * 17}), "spec.resources.cpu"),
    (_with("spec.replicas", -1), "spec.replicas"),
    (_with("spec.autoscaling", {"intervalSeconds": 0}), "spec.autoscaling.intervalSeconds"),
    (
        _with("spec.scheduling", {"tolerations": [{"operator": "Maybe"}]}),
        "spec.scheduling.tolerations.0.operator",
    ),
    (_with("spec.replica", 2), "spec: Additional properties"),  # a typo is an error under strict validation
    (_with("spec.image", ""), "spec.image"),
]


@pytest.mark.parametrize(("isvc", "where"), BAD_SCHEMA, ids=[w for _, w in BAD_SCHEMA])
def test_schema_rejects_bad_fields(isvc: dict[str, Any], where: str) -> None:
    _, errors = admit(isvc)
    assert any(e.startswith(where) for e in errors), errors


EXAMPLES = sorted((MANIFESTS / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_admitted(path: Any) -> None:
    for doc in load_yaml_docs(path):
        assert doc["apiVersion"] == crd.API_VERSION and doc["kind"] == crd.KIND
        defaulted, errors = admit(doc)
        assert errors == [], f"{path.name}: {errors}"
        assert schema_errors(defaulted) == []


def test_defaults_fill_nested_objects() -> None:
    defaulted = crd.apply_defaults(crd.openapi_schema(), make_isvc())
    spec = defaulted["spec"]
    assert spec["engine"]["blockSize"] == 16 and spec["engine"]["extraArgs"] == []
    assert spec["engine"]["kvCacheDtype"] == "auto"
    assert spec["autoscaling"]["enabled"] is False  # given
    assert spec["autoscaling"]["targetInFlightPerReplica"] == 16  # defaulted next to it
    assert spec["prepull"] == {"enabled": True}
    assert spec["warmPool"] == 0 and spec["balloons"] == 0 and spec["drainTimeoutSeconds"] == 30
    # YAML nulls (a key whose every child is commented out) are pruned and defaulted, as the API
    # server does for fields that are not nullable
    nulls = make_isvc(resources=None, autoscaling=None, engine={"dtype": None, "maxNumSeqs": 8})
    spec = crd.apply_defaults(crd.openapi_schema(), nulls)["spec"]
    assert spec["resources"] == {"gpus": 1, "cpu": "4", "memory": "16Gi"}
    assert spec["autoscaling"]["enabled"] is True and spec["engine"]["dtype"] == "auto"
    assert spec["engine"]["maxNumSeqs"] == 8 and "maxModelLen" not in spec["engine"]
