"""The typed, defaulted view of one InferenceService, built once and passed to the plan.

The API server has already enforced the CRD's OpenAPI and CEL rules on anything read from a
cluster; `render -f` has no such server, so `from_body` re-checks what the plan relies on and
raises `SpecError` (a user-input error, never an assert).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal

from inferfleet.operator import crd

SourceScheme = Literal["pvc", "oci", "hf", "tiny"]
_SOURCE_RE = re.compile(crd.SOURCE_PATTERN)
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MANAGED_FLAG_RE = re.compile(crd.MANAGED_FLAG_PATTERN)
# Built once: apply_defaults only reads it (and copies the defaults it takes from it).
_SPEC_SCHEMA = crd.spec_schema()
_KV_CACHE_DTYPES: list[str] = _SPEC_SCHEMA["properties"]["engine"]["properties"]["kvCacheDtype"]["enum"]


class SpecError(ValueError):
    """An InferenceService the operator cannot turn into objects; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class ModelSource:
    scheme: SourceScheme
    location: str  # claim name, image reference, ORG/NAME repository, or architecture
    path: str = ""  # pvc:// only: the directory inside the claim

    @classmethod
    def parse(cls, uri: str) -> ModelSource:
        if not _SOURCE_RE.match(uri):
            raise SpecError("spec.model.source", f"unsupported model source {uri!r}")
        scheme, rest = uri.split("://", 1)
        if scheme == "pvc":
            claim, _, path = rest.partition("/")
            return cls("pvc", claim, path.strip("/"))
        if scheme == "oci":
            return cls("oci", rest)
        if scheme == "hf":
            return cls("hf", rest)
        return cls("tiny", rest)


@dataclasses.dataclass(frozen=True)
class SecretRef:
    name: str
    key: str

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> SecretRef | None:
        return None if not raw else cls(str(raw["name"]), str(raw["key"]))


@dataclasses.dataclass(frozen=True)
class Engine:
    dtype: str
    quantization: str
    kv_cache_dtype: str
    max_model_len: int | None  # None: the model's own limit (no flag)
    max_num_seqs: int
    block_size: int
    gpu_memory_utilization: float
    prefix_caching: bool
    extra_args: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Autoscaling:
    enabled: bool
    target_in_flight_per_replica: int
    interval_seconds: int
    scale_down_delay_seconds: int


@dataclasses.dataclass(frozen=True)
class Scheduling:
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    affinity: Mapping[str, Any]
    priority_class_name: str


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """One InferenceService, defaulted and checked. Times in seconds."""

    name: str
    namespace: str
    uid: str | None  # None when rendered without a cluster: no owner references then
    generation: int
    model_name: str
    source: ModelSource
    model_token: SecretRef | None
    image: str
    image_pull_policy: str
    gpus: int
    cpu: str
    memory: str
    engine: Engine
    replicas: int
    min_replicas: int
    max_replicas: int
    warm_pool: int
    autoscaling: Autoscaling
    prepull_enabled: bool
    prepull_node_selector: Mapping[str, str]
    balloons: int
    scheduling: Scheduling
    api_key: SecretRef | None
    startup_timeout_seconds: int
    drain_timeout_seconds: int

    @property
    def worker_pods(self) -> int:
        return self.demand_replicas + self.warm_pool

    @property
    def demand_replicas(self) -> int:
        """spec.replicas, brought within [minReplicas, maxReplicas] while the autoscaler owns it.
        The CRD admits replicas outside the bounds (Git lowering maxReplicas below what the
        autoscaler reached must not be refused); the autoscaler writes the bounded value back at
        its next interval, and the plan does not wait for it."""
        if not self.autoscaling.enabled:
            return self.replicas  # yours (kubectl scale, an HPA, KEDA): taken as it is
        return max(self.min_replicas, min(self.max_replicas, self.replicas))

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ServiceSpec:
        meta = body.get("metadata") or {}
        name = str(meta.get("name") or "")
        if not _NAME_RE.match(name) or len(name) > crd.MAX_NAME_LENGTH:
            raise SpecError("metadata.name", f"{name!r} is not a DNS-1035 label of <= {crd.MAX_NAME_LENGTH}")
        if body.get("spec") is None:
            raise SpecError("spec", "is required")
        spec = crd.apply_defaults(_SPEC_SCHEMA, dict(body["spec"]))
        for required in ("model", "image"):
            if required not in spec:
                raise SpecError(f"spec.{required}", "is required")
        model, res, eng, auto = spec["model"], spec["resources"], spec["engine"], spec["autoscaling"]
        sched = spec["scheduling"]
        out = cls(
            name=name,
            namespace=str(meta.get("namespace") or "default"),
            uid=meta.get("uid"),
            generation=int(meta.get("generation") or 1),
            model_name=str(model["name"]),
            source=ModelSource.parse(str(model["source"])),
            model_token=SecretRef.parse(model.get("tokenSecretRef")),
            image=str(spec["image"]),
            image_pull_policy=str(spec["imagePullPolicy"]),
            gpus=int(res["gpus"]),
            cpu=str(res["cpu"]),
            memory=str(res["memory"]),
            engine=Engine(
                dtype=str(eng["dtype"]),
                quantization=str(eng["quantization"]),
                kv_cache_dtype=str(eng["kvCacheDtype"]),
                max_model_len=None if eng.get("maxModelLen") is None else int(eng["maxModelLen"]),
                max_num_seqs=int(eng["maxNumSeqs"]),
                block_size=int(eng["blockSize"]),
                gpu_memory_utilization=float(eng["gpuMemoryUtilization"]),
                prefix_caching=bool(eng["prefixCaching"]),
                extra_args=tuple(str(a) for a in eng["extraArgs"]),
            ),
            replicas=int(spec["replicas"]),
            min_replicas=int(spec["minReplicas"]),
            max_replicas=int(spec["maxReplicas"]),
            warm_pool=int(spec["warmPool"]),
            autoscaling=Autoscaling(
                enabled=bool(auto["enabled"]),
                target_in_flight_per_replica=int(auto["targetInFlightPerReplica"]),
                interval_seconds=int(auto["intervalSeconds"]),
                scale_down_delay_seconds=int(auto["scaleDownDelaySeconds"]),
            ),
            prepull_enabled=bool(spec["prepull"]["enabled"]),
            prepull_node_selector=dict(spec["prepull"].get("nodeSelector") or {}),
            balloons=int(spec["balloons"]),
            scheduling=Scheduling(
                node_selector=dict(sched.get("nodeSelector") or {}),
                tolerations=tuple(dict(t) for t in sched.get("tolerations") or ()),
                affinity=dict(sched.get("affinity") or {}),
                priority_class_name=str(sched["priorityClassName"]),
            ),
            api_key=SecretRef.parse(spec.get("apiKeySecretRef")),
            startup_timeout_seconds=int(spec["startupTimeoutSeconds"]),
            drain_timeout_seconds=int(spec["drainTimeoutSeconds"]),
        )
        out._check()
        return out

    def _check(self) -> None:
        """The CRD's CEL rules, restated for bodies that never met an API server."""
        if not self.min_replicas <= self.max_replicas:
            raise SpecError("spec.minReplicas", "must not exceed maxReplicas")
        if self.warm_pool > self.max_replicas:
            raise SpecError("spec.warmPool", "must not exceed maxReplicas")
        if self.autoscaling.enabled and self.min_replicas == 0 and self.warm_pool == 0:
            raise SpecError("spec.minReplicas", "autoscaling from 0 needs warmPool >= 1")
        if self.engine.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise SpecError(
                "spec.engine.kvCacheDtype",
                f"must be {' or '.join(_KV_CACHE_DTYPES)}, got {self.engine.kv_cache_dtype!r}",
            )
        # Each field is valid alone, so the CRD admits fp8 with gpus 0. FP8 weights run on GPUs of
        # compute capability >= 8.9 only (the worker refuses them on a CPU at startup: said here
        # before a pod crash-loops); an fp8 KV cache would even run on a CPU (torch converts), but
        # it is a GPU feature: a CPU worker asking for either is an InvalidSpec.
        for field, value, instead in (
            ("spec.engine.kvCacheDtype", self.engine.kv_cache_dtype, "a CPU worker (gpus 0) must use auto"),
            ("spec.engine.quantization", self.engine.quantization, "a CPU worker can use int8 or gptq"),
        ):
            if value == "fp8" and self.gpus == 0:
                raise SpecError(
                    field,
                    "fp8 needs a GPU worker (resources.gpus >= 1, compute capability >= 8.9); " + instead,
                )
        for arg in self.engine.extra_args:
            if _MANAGED_FLAG_RE.match(arg):
                raise SpecError("spec.engine.extraArgs", f"{arg!r} is set by the operator")
