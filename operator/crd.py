"""The InferenceService CRD: the one schema source that generates crds/ and fills defaults.

Every number, string and list carries a bound: the API server estimates the cost of each CEL
rule from those bounds and refuses a CRD whose worst case is unbounded. The cross-field rules
live next to the fields they relate (`x-kubernetes-validations`), each with a message that
names the fields, so `kubectl apply` explains itself.

`python -m inferfleet.operator.crd > crds/inferfleet.io_inferenceservices.yaml` regenerates
the checked-in YAML; tests/operator/test_operator_crd.py fails when the two drift apart.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import yaml

GROUP = "inferfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
SHORT_NAMES = ("ifsvc",)
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILENAME = f"{GROUP}_{PLURAL}.yaml"

# `<name>-prepull` and `<name>-balloon` must stay valid DNS-1035 labels (63 characters);
# the Service is named like the InferenceService, so the name must start with a letter.
MAX_NAME_LENGTH = 50
MODEL_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
SOURCE_PATTERN = (
    r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?"
    r"|oci://[^\s]+"
    r"|hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*"
    r"|tiny://(" + "|".join(MODEL_ARCHS) + r"))$"
)
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"
# Flags the operator derives from other fields; letting extraArgs repeat them would make the
# worker's behaviour depend on argparse's last-one-wins rule instead of the spec.
MANAGED_FLAGS = (
    "model",
    "host",
    "port",
    "served-model-name",
    "api-key",
    "drain-timeout",
    "dtype",
    "max-model-len",
    "max-num-seqs",
    "block-size",
    "gpu-memory-utilization",
    "quantization",
    "kv-cache-dtype",
    "enable-prefix-caching",
    "no-enable-prefix-caching",
)
# An extraArgs entry that sets one of them (`--flag` or `--flag=value`): the CRD's CEL rule and
# the operator's own check (spec.py) both match with this.
MANAGED_FLAG_PATTERN = r"^--(" + "|".join(MANAGED_FLAGS) + r")(=|$)"

Schema = dict[str, Any]


def _string(max_length: int, **extra: Any) -> Schema:
    return {"type": "string", "maxLength": max_length, **extra}


def _quantity(default: str) -> Schema:
    """A resource quantity as core Kubernetes takes it: `cpu: 8` or `cpu: "500m"` (controller-gen's
    schema for resource.Quantity; the pattern and the length bound apply to the string form)."""
    return {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-int-or-string": True,
        "pattern": QUANTITY_PATTERN,
        "maxLength": 16,
        "default": default,
    }


def _integer(minimum: int, maximum: int, **extra: Any) -> Schema:
    return {"type": "integer", "format": "int32", "minimum": minimum, "maximum": maximum, **extra}


def _generation() -> Schema:
    return {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**53 - 1}


def _object(properties: Mapping[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": dict(properties)}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def _rule(rule: str, message: str = "", message_expression: str = "", reason: str = "") -> Schema:
    out: Schema = {"rule": rule}
    if message:
        out["message"] = message
    if message_expression:
        out["messageExpression"] = message_expression
    if reason:
        out["reason"] = reason
    return out


def _string_map(max_properties: int) -> Schema:
    return {
        "type": "object",
        "maxProperties": max_properties,
        "additionalProperties": _string(63),
    }


def _secret_ref(description: str) -> Schema:
    return _object(
        {"name": _string(253, minLength=1), "key": _string(253, minLength=1)},
        required=("name", "key"),
        description=description,
    )


def _toleration() -> Schema:
    return _object(
        {
            "key": _string(316),
            "operator": _string(16, enum=["Exists", "Equal"]),
            "value": _string(63),
            "effect": _string(32, enum=["NoSchedule", "PreferNoSchedule", "NoExecute"]),
            "tolerationSeconds": {"type": "integer", "format": "int64", "minimum": 0, "maximum": 31536000},
        }
    )


def _spec_schema() -> Schema:
    scheme_rule = _rule(
        "self.source.startsWith('pvc://') || self.source.startsWith('oci://')"
        " || self.source.startsWith('hf://') || self.source.startsWith('tiny://')",
        message="model.source must start with pvc://, oci://, hf:// or tiny://",
        reason="FieldValueInvalid",
    )
    model = _object(
        {
            "name": _string(
                128,
                minLength=1,
                pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
                description="The name clients put in the OpenAI `model` field (--served-model-name).",
            ),
            "source": _string(
                512,
                pattern=SOURCE_PATTERN,
                description="pvc://CLAIM/PATH, oci://IMAGE (an image volume), hf://ORG/NAME or tiny://ARCH.",
            ),
            "tokenSecretRef": _secret_ref("hf:// only: a Secret key holding a Hugging Face token."),
        },
        required=("name", "source"),
        **{"x-kubernetes-validations": [scheme_rule]},
    )
    resources = _object(
        {
            "gpus": _integer(0, 16, default=1, description="nvidia.com/gpu per worker pod."),
            "cpu": _quantity("4"),
            "memory": _quantity("16Gi"),
        },
        default={},
    )
    engine = _object(
        {
            "dtype": _string(16, enum=["auto", "float32", "bfloat16", "float16"], default="auto"),
            "quantization": _string(16, enum=["none", "fp8", "int8", "gptq"], default="none"),
            "kvCacheDtype": _string(
                16,
                enum=["auto", "fp8"],
                default="auto",
                description="KV cache element type (--kv-cache-dtype): auto = the model dtype; fp8 = "
                "float8_e4m3fn with the checkpoint's per-layer k/v scales (kv_cache_scheme) or 1.0, values "
                "clamped to +-448 x scale (twice the KV capacity). fp8 needs "
                "resources.gpus >= 1 (compute capability >= 8.9).",
            ),
            "maxModelLen": _integer(
                16,
                1048576,
                description="--max-model-len; unset: the model's own limit (max_position_embeddings). "
                "The worker refuses a value above that limit at startup.",
            ),
            "maxNumSeqs": _integer(1, 4096, default=256),
            # the worker's paged KV cache takes powers of two only
            "blockSize": _integer(1, 256, default=16, enum=[2**i for i in range(9)]),
            "gpuMemoryUtilization": {"type": "number", "minimum": 0.05, "maximum": 0.99, "default": 0.9},
            "prefixCaching": {"type": "boolean", "default": True},
            "extraArgs": {
                "type": "array",
                "maxItems": 32,
                "items": _string(256),
                "default": [],
                "description": "Passed to `inferfleet-worker serve` after the managed flags.",
            },
        },
        default={},
        **{
            "x-kubernetes-validations": [
                _rule(
                    f"!self.extraArgs.exists(a, a.matches('{MANAGED_FLAG_PATTERN}'))",
                    message="engine.extraArgs must not repeat a flag the operator sets from the spec",
                )
            ]
        },
    )
    autoscaling = _object(
        {
            "enabled": {"type": "boolean", "default": True},
            "targetInFlightPerReplica": _integer(1, 100000, default=16),
            "intervalSeconds": _integer(1, 3600, default=10),
            "scaleDownDelaySeconds": _integer(0, 86400, default=300),
        },
        default={},
    )
    prepull = _object(
        {
            "enabled": {"type": "boolean", "default": True},
            "nodeSelector": {
                **_string_map(32),
                "description": "Nodes to pre-pull onto; empty means the workers' nodeSelector.",
            },
        },
        default={},
    )
    scheduling = _object(
        {
            "nodeSelector": _string_map(32),
            "tolerations": {"type": "array", "maxItems": 32, "items": _toleration()},
            "affinity": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "A core/v1 Affinity, copied verbatim into worker and balloon pods.",
            },
            "priorityClassName": _string(253, default=""),
        },
        default={},
    )
    properties: dict[str, Schema] = {
        "model": model,
        "image": _string(512, minLength=1, pattern=r"^[^\s]+$"),
        "imagePullPolicy": _string(16, enum=["Always", "IfNotPresent", "Never"], default="IfNotPresent"),
        "resources": resources,
        "engine": engine,
        "replicas": _integer(0, 1000, default=1, description="Demand replicas (scale subresource)."),
        "minReplicas": _integer(0, 1000, default=1),
        "maxReplicas": _integer(1, 1000, default=8),
        "warmPool": _integer(0, 64, default=0, description="Extra ready replicas kept above demand."),
        "autoscaling": autoscaling,
        "prepull": prepull,
        "balloons": _integer(
            0, 64, default=0, description="Placeholder pods holding one worker's resources."
        ),
        "scheduling": scheduling,
        "apiKeySecretRef": _secret_ref("A Secret key exported to workers as INFERFLEET_API_KEY."),
        "startupTimeoutSeconds": _integer(30, 21600, default=1800),
        "drainTimeoutSeconds": _integer(0, 3600, default=30),
    }
    rules = [
        _rule(
            "self.minReplicas <= self.maxReplicas",
            message_expression="'minReplicas (' + string(self.minReplicas)"
            " + ') must not exceed maxReplicas (' + string(self.maxReplicas) + ')'",
        ),
        _rule(
            "self.warmPool <= self.maxReplicas",
            message="warmPool must not exceed maxReplicas",
        ),
        _rule(
            "!self.autoscaling.enabled || self.minReplicas > 0 || self.warmPool > 0",
            message="autoscaling with minReplicas 0 needs warmPool >= 1: the load signal comes from ready pods",
        ),
    ]
    return _object(properties, required=("model", "image"), **{"x-kubernetes-validations": rules})


def _status_schema() -> Schema:
    condition = _object(
        {
            "type": _string(32),
            "status": _string(8, enum=["True", "False", "Unknown"]),
            "reason": _string(64),
            "message": _string(1024),
            "lastTransitionTime": _string(64, format="date-time"),
            "observedGeneration": _generation(),
        },
        required=("type", "status"),
    )
    counts = _object({"desired": _integer(0, 100000), "ready": _integer(0, 100000)})
    autoscaler = _object(
        {
            "load": {"type": "number", "minimum": 0, "maximum": 1e9},
            "desired": _integer(0, 1000),
            "replicas": _integer(0, 1000),
            "reason": _string(64),
            "message": _string(512),
            "time": _string(64, format="date-time"),
            "lowerSince": _string(64, format="date-time"),
            "lowerPeak": _integer(0, 1000),
        }
    )
    return _object(
        {
            "observedGeneration": _generation(),
            "replicas": _integer(0, 100000),
            "readyReplicas": _integer(0, 100000),
            "warmReplicas": _integer(0, 100000),
            "selector": _string(512),
            "endpoint": _string(512),
            "prepull": counts,
            "balloons": counts,
            "conditions": {
                "type": "array",
                "maxItems": 8,
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "autoscaler": autoscaler,
        }
    )


def openapi_schema() -> Schema:
    """The v1alpha1 openAPIV3Schema (a fresh copy each call: callers may mutate it)."""
    # CEL sees metadata.name as an unbounded string, so only O(1) operations are affordable on
    # it: a regex over it would price the CRD out of the API server's cost budget. The
    # DNS-1035 shape (no dots, a leading letter) the Service name needs is checked by the
    # operator instead, which reports an InvalidSpec condition.
    name_rules = [
        _rule(
            f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            message=f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
            "(children are named <name>-prepull and <name>-balloon)",
        ),
    ]
    return _object(
        {
            "apiVersion": _string(64),
            "kind": _string(64),
            "metadata": {"type": "object"},
            "spec": _spec_schema(),
            "status": _status_schema(),
        },
        required=("spec",),
        **{"x-kubernetes-validations": name_rules},
    )


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object as checked into crds/."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "inferfleet"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["inferfleet"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
                        {"name": "Warm", "type": "integer", "jsonPath": ".status.warmReplicas"},
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    header = "# Generated from operator/crd.py by `python -m inferfleet.operator.crd`. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=1000)


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Fill `default`s the way the API server does, returning a new value.

    Defaults apply to absent properties of present objects; a defaulted object is then
    defaulted itself (so `engine: {}` gains every engine default). A null where the schema is not
    nullable (`resources:` with every line under it commented out) is dropped first, as the API
    server prunes it, and so defaulted like an absent field. `render` uses this so it prints what
    the cluster would run. Neither `schema` nor `value` is modified, and the result shares no
    object with either: each part is copied once, on the way through.
    """
    if not isinstance(value, dict) or schema.get("type") != "object":
        return copy.deepcopy(value)
    properties = schema.get("properties", {})
    out = {
        key: apply_defaults(properties[key], v) if key in properties else copy.deepcopy(v)
        for key, v in value.items()
        if v is not None or key not in properties or properties[key].get("nullable")
    }
    for key, sub in properties.items():
        if key not in out and "default" in sub:
            out[key] = apply_defaults(sub, sub["default"])
    return out


def spec_schema() -> Schema:
    """The schema of `spec` (openapi_schema()'s properties.spec), a fresh copy each call."""
    return _spec_schema()


if __name__ == "__main__":
    print(render_crd_yaml(), end="")
