"""plan(isvc) as a table: the children each spec yields, what they contain, and that every one
passes kubernetes-validate (strict) for Kubernetes 1.30 and 1.33."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes_validate
import pytest
from ifo_support import K8S_VERSIONS, make_isvc
from inferfleet.operator import contract, labels
from inferfleet.operator.plan import all_child_refs, plan, spec_hash
from inferfleet.operator.spec import ServiceSpec, SpecError

GPU_SCHED = {
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu.type", "operator": "In", "values": ["h100", "a100"]}]}
                ]
            }
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 10,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"inferfleet.io/service": "llm"}},
                    },
                }
            ]
        },
    },
    "priorityClassName": "inference-high",
}
GPU = make_isvc(
    model={
        "name": "llama-3.1-8b",
        "source": "hf://meta-llama/Llama-3.1-8B-Instruct",
        "tokenSecretRef": {"name": "hf", "key": "token"},
    },
    resources={"gpus": 2, "cpu": "8", "memory": "64Gi"},
    engine={"dtype": "bfloat16", "maxModelLen": 8192},
    replicas=2,
    maxReplicas=8,
    warmPool=1,
    balloons=2,
    prepull={"enabled": True, "nodeSelector": {"pool": "gpu"}},
    scheduling=GPU_SCHED,
    apiKeySecretRef={"name": "keys", "key": "api"},
    drainTimeoutSeconds=60,
    startupTimeoutSeconds=3600,
)

# name -> (InferenceService, expected children as kind/name)
TABLE: dict[str, tuple[dict[str, Any], list[str]]] = {
    "tiny-defaults": (
        make_isvc(),
        ["Deployment/llm", "Service/llm", "DaemonSet/llm-prepull"],
    ),
    "gpu-warm-balloons": (
        GPU,
        [
            "Deployment/llm",
            "Service/llm",
            "PodDisruptionBudget/llm",
            "DaemonSet/llm-prepull",
            "Deployment/llm-balloon",
        ],
    ),
    "pvc": (
        make_isvc(
            model={"name": "m", "source": "pvc://model-store/llama/8b"},
            replicas=2,
            prepull={"enabled": False},
        ),
        ["Deployment/llm", "Service/llm", "PodDisruptionBudget/llm"],
    ),
    "oci": (
        make_isvc(model={"name": "m", "source": "oci://registry.example.com/models/llama:8b"}, balloons=1),
        ["Deployment/llm", "Service/llm", "DaemonSet/llm-prepull", "Deployment/llm-balloon"],
    ),
    "quantized": (
        make_isvc(
            resources={"gpus": 1},
            engine={"quantization": "fp8", "prefixCaching": False, "extraArgs": ["--enforce-eager"]},
            prepull={"enabled": False},
        ),
        ["Deployment/llm", "Service/llm"],
    ),
    "warm-pool-only": (
        make_isvc(replicas=0, minReplicas=0, warmPool=1, prepull={"enabled": False}),
        ["Deployment/llm", "Service/llm"],
    ),
    "fp8-kv-cache": (
        make_isvc(
            resources={"gpus": 1},
            engine={"dtype": "bfloat16", "kvCacheDtype": "fp8", "extraArgs": ["--enforce-eager"]},
            prepull={"enabled": False},
        ),
        ["Deployment/llm", "Service/llm"],
    ),
}
CASES = list(TABLE)


def rendered(case: str) -> list[dict[str, Any]]:
    return plan(TABLE[case][0])


def by_ref(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        if o["kind"] in ("Deployment", "DaemonSet"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]


def containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers") or []) + list(pod["containers"])


def worker(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_ref(objs)["Deployment/llm"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("case", CASES)
def test_children(case: str) -> None:
    assert list(by_ref(rendered(case))) == TABLE[case][1]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", [c for c in CASES if c != "oci"])
def test_every_child_is_valid_kubernetes(case: str, version: str) -> None:
    for obj in rendered(case):
        kubernetes_validate.validate(obj, version, strict=True)


def test_oci_model_needs_image_volumes_from_kubernetes_1_31() -> None:
    """Image volumes (`volumes[].image`) entered the API in 1.31 (alpha; beta in 1.33): the
    1.30 schema rejects them, which docs/operator.md states as the oci:// requirement."""
    objs = rendered("oci")
    for version in ("1.31", "1.33"):
        for obj in objs:
            kubernetes_validate.validate(obj, version, strict=True)
    with_image_volume = [o for o in objs if o["kind"] in ("Deployment", "DaemonSet")]
    for obj in with_image_volume:
        with pytest.raises(kubernetes_validate.ValidationError) as info:
            kubernetes_validate.validate(obj, "1.30", strict=True)
        assert "image" in str(info.value.message)
    for obj in objs:
        if obj["kind"] == "Service":
            kubernetes_validate.validate(obj, "1.30", strict=True)
    vol = worker(objs)["volumes"][0]
    assert vol == {
        "name": "model",
        "image": {"reference": "registry.example.com/models/llama:8b", "pullPolicy": "IfNotPresent"},
    }
    assert "--model" in worker(objs)["containers"][0]["args"]
    # pre-pull and balloon pods pull the model image through the same volume (no command needed)
    for ref in ("DaemonSet/llm-prepull", "Deployment/llm-balloon"):
        pod = by_ref(objs)[ref]["spec"]["template"]["spec"]
        assert pod["volumes"] == [vol]


@pytest.mark.parametrize("case", CASES)
def test_pods_meet_pod_security_restricted(case: str) -> None:
    # Pod Security Admission's restrictedVolumes check (k8s.io/pod-security-admission) allows
    # exactly these. Image volumes are not among them (they pass "baseline"): an oci:// model's
    # pods deviate in that one check, and docs/operator.md says so.
    allowed_volumes = {
        "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"
    }  # fmt: skip
    if case == "oci":
        allowed_volumes.add("image")
    for ref, pod in pod_specs(rendered(case)):
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, ref
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, ref
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), ref
        assert pod["automountServiceAccountToken"] is False, ref
        for vol in pod.get("volumes") or []:
            assert set(vol) - {"name"} <= allowed_volumes, (ref, vol)
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (ref, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (ref, c["name"])
            assert sc["runAsNonRoot"] is True and not sc.get("privileged"), (ref, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (ref, c["name"])


def test_worker_deployment_contract() -> None:
    objs = rendered("gpu-warm-balloons")
    deploy = by_ref(objs)["Deployment/llm"]
    assert deploy["spec"]["replicas"] == 3  # replicas 2 + warmPool 1
    assert deploy["spec"]["selector"] == {"matchLabels": {labels.SERVICE: "llm", labels.COMPONENT: "worker"}}
    pod = worker(objs)
    (c,) = pod["containers"]
    assert c["command"] == ["inferfleet-worker"]
    assert c["args"] == [
        "serve",
        "--model", "/models/meta-llama--Llama-3.1-8B-Instruct",
        "--host", "0.0.0.0",
        "--port", "8000",
        "--served-model-name", "llama-3.1-8b",
        "--dtype", "bfloat16",
        "--max-model-len", "8192",
        "--max-num-seqs", "256",
        "--block-size", "16",
        "--gpu-memory-utilization", "0.9",
        "--quantization", "none",
        "--drain-timeout", "60",
    ]  # fmt: skip
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600  # the start-up budget
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["resources"]["requests"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"}
    assert "cpu" not in c["resources"]["limits"]
    # serving on until endpoints drop the pod, then draining: SIGKILL after both
    assert c["lifecycle"] == {"preStop": {"sleep": {"seconds": contract.ENDPOINT_GRACE_SECONDS}}}
    assert pod["terminationGracePeriodSeconds"] == contract.ENDPOINT_GRACE_SECONDS + 60 + 15
    env = {e["name"]: e for e in c["env"]}
    assert env[contract.API_KEY_ENV]["valueFrom"] == {"secretKeyRef": {"name": "keys", "key": "api"}}
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod[key] == GPU_SCHED[key]
    # hf:// becomes an init container downloading into the model emptyDir, token from the Secret.
    (fetch,) = pod["initContainers"]
    assert fetch["name"] == "fetch-model" and fetch["image"] == GPU["spec"]["image"]
    assert fetch["command"][:2] == ["python3", "-c"]
    assert fetch["command"][3:] == [
        "meta-llama/Llama-3.1-8B-Instruct",
        "/models/meta-llama--Llama-3.1-8B-Instruct",
    ]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in fetch["env"]
    compile(fetch["command"][2], "fetch-model", "exec")  # the download script is valid Python
    assert next(v for v in pod["volumes"] if v["name"] == "model") == {"name": "model", "emptyDir": {}}


def test_tiny_source_runs_make_tiny_model() -> None:
    pod = worker(rendered("tiny-defaults"))
    (init,) = pod["initContainers"]
    assert init["command"] == [
        "inferfleet-worker",
        "make-tiny-model",
        "/models/tiny-llama",
        "--arch",
        "llama",
    ]
    assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/models/tiny-llama"
    assert "nvidia.com/gpu" not in str(pod)  # a CPU service requests no GPU anywhere


def test_pvc_source_is_mounted_read_only() -> None:
    pod = worker(rendered("pvc"))
    assert pod["volumes"][0] == {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "model-store", "readOnly": True},
    }
    c = pod["containers"][0]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    assert c["args"][c["args"].index("--model") + 1] == "/models/llama/8b"
    assert "initContainers" not in pod


def test_engine_settings_become_worker_flags() -> None:
    args = worker(rendered("quantized"))["containers"][0]["args"]
    assert args[args.index("--quantization") + 1] == "fp8"
    assert "--no-enable-prefix-caching" in args
    assert args[-1] == "--enforce-eager"  # extraArgs go last


def test_fp8_kv_cache_becomes_a_worker_flag() -> None:
    args = worker(rendered("fp8-kv-cache"))["containers"][0]["args"]
    assert args[args.index("--kv-cache-dtype") + 1] == "fp8"
    assert args.index("--kv-cache-dtype") < args.index("--drain-timeout")  # a managed flag, before extraArgs
    assert args[-1] == "--enforce-eager"
    # auto (the default) adds no flag: the worker's default is the same, and existing templates keep their hash
    for case in ("tiny-defaults", "gpu-warm-balloons", "quantized"):
        assert "--kv-cache-dtype" not in worker(rendered(case))["containers"][0]["args"]
    explicit_auto = make_isvc(resources={"gpus": 1}, engine={"kvCacheDtype": "auto"})
    assert plan(explicit_auto) == plan(make_isvc(resources={"gpus": 1}))


def test_prepull_daemonset() -> None:
    ds = by_ref(rendered("gpu-warm-balloons"))["DaemonSet/llm-prepull"]
    pod = ds["spec"]["template"]["spec"]
    (pull,) = pod["initContainers"]
    assert pull["image"] == GPU["spec"]["image"] and pull["command"] == ["python3", "-c", "pass"]
    (pause,) = pod["containers"]
    assert pause["image"] == contract.PAUSE_IMAGE
    for c in containers(pod):
        assert "nvidia.com/gpu" not in str(c["resources"])  # never a GPU
        assert c["resources"]["requests"]["cpu"] == "1m"
    assert pod["nodeSelector"] == {"pool": "gpu"}  # prepull.nodeSelector wins over the workers'
    assert pod["tolerations"] == GPU_SCHED["tolerations"]
    assert pod["affinity"] == {"nodeAffinity": GPU_SCHED["affinity"]["nodeAffinity"]}  # nodes only
    assert "priorityClassName" not in pod
    # Without its own nodeSelector it follows the workers'.
    follow = copy.deepcopy(GPU)
    follow["spec"]["prepull"] = {"enabled": True}
    ds2 = by_ref(plan(follow))["DaemonSet/llm-prepull"]
    assert ds2["spec"]["template"]["spec"]["nodeSelector"] == GPU_SCHED["nodeSelector"]


def test_balloon_deployment() -> None:
    objs = rendered("gpu-warm-balloons")
    balloon = by_ref(objs)["Deployment/llm-balloon"]
    assert balloon["spec"]["replicas"] == 2
    assert balloon["spec"]["strategy"] == {"type": "Recreate"}
    pod = balloon["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "inferfleet-balloon"
    assert pod["terminationGracePeriodSeconds"] == 0
    (pause,) = pod["containers"]
    assert pause["image"] == contract.PAUSE_IMAGE
    assert pause["resources"] == worker(objs)["containers"][0]["resources"]  # one worker's worth, GPUs too
    (pull,) = pod["initContainers"]
    assert pull["image"] == GPU["spec"]["image"]
    for key in ("nodeSelector", "tolerations", "affinity"):
        assert pod[key] == GPU_SCHED[key]
    assert (
        balloon["spec"]["selector"]["matchLabels"][labels.COMPONENT] == "balloon"
    )  # never behind the Service


def test_service_and_pdb() -> None:
    objs = by_ref(rendered("gpu-warm-balloons"))
    svc = objs["Service/llm"]["spec"]
    assert svc["type"] == "ClusterIP"
    assert svc["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert svc["selector"] == {labels.SERVICE: "llm", labels.COMPONENT: "worker"}
    pdb = objs["PodDisruptionBudget/llm"]["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["selector"]["matchLabels"] == svc["selector"]
    assert "PodDisruptionBudget/llm" not in by_ref(plan(make_isvc(replicas=1)))  # one pod: no budget


def test_spec_hash_rolls_pods_only_when_the_template_changes() -> None:
    def template_hash(isvc: dict[str, Any]) -> str:
        ann = by_ref(plan(isvc))["Deployment/llm"]["spec"]["template"]["metadata"]["annotations"]
        return str(ann[labels.SPEC_HASH])

    base = make_isvc(replicas=1, maxReplicas=8)
    assert template_hash(base) == template_hash(make_isvc(replicas=5, maxReplicas=8, warmPool=2))
    assert template_hash(base) != template_hash(
        make_isvc(image="registry.example.com/inferfleet-worker:0.2.0")
    )
    assert template_hash(base) != template_hash(make_isvc(engine={"maxNumSeqs": 8}))
    for obj in plan(base):
        body = {k: v for k, v in obj.items() if k != "metadata"}
        assert obj["metadata"]["annotations"][labels.SPEC_HASH] == spec_hash(body)


def test_owner_references_only_with_a_uid() -> None:
    assert all("ownerReferences" not in o["metadata"] for o in plan(make_isvc()))
    owned = make_isvc()
    owned["metadata"]["uid"] = "1234"
    for obj in plan(owned):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == "1234" and ref["controller"] is True and ref["kind"] == "InferenceService"


def test_plan_is_pure() -> None:
    isvc = copy.deepcopy(GPU)
    assert plan(isvc) == plan(isvc)
    assert isvc == GPU  # input untouched
    s = ServiceSpec.from_body(isvc)
    assert {f"{r.kind}/{r.name}" for r in all_child_refs(s)} >= set(by_ref(plan(isvc)))


def test_replicas_outside_the_bounds() -> None:
    """The CRD admits replicas outside [minReplicas, maxReplicas] (a GitOps change of the bounds
    must not be refused because of what the autoscaler wrote). While the autoscaler owns replicas,
    the workers follow the bounded value at once (it writes that value back at its next interval);
    without it, replicas is taken as it is."""

    def workers(**spec: Any) -> int:
        return int(by_ref(plan(make_isvc(**spec)))["Deployment/llm"]["spec"]["replicas"])

    on = {"autoscaling": {"enabled": True}}
    assert workers(replicas=9, maxReplicas=4, **on) == 4
    assert workers(replicas=1, minReplicas=2, warmPool=1, **on) == 3
    assert workers(replicas=3, minReplicas=2, **on) == 3
    assert workers(replicas=9, maxReplicas=4) == 9
    assert workers(replicas=1, minReplicas=2) == 1


@pytest.mark.parametrize(
    ("isvc", "field"),
    [
        (make_isvc(model={"name": "m", "source": "s3://bucket/x"}), "spec.model.source"),
        (make_isvc(minReplicas=3, replicas=3, maxReplicas=2), "spec.minReplicas"),
        (make_isvc(warmPool=9), "spec.warmPool"),
        (make_isvc(engine={"extraArgs": ["--served-model-name=x"]}), "spec.engine.extraArgs"),
        (make_isvc(engine={"extraArgs": ["--kv-cache-dtype=fp8"]}), "spec.engine.extraArgs"),
        # fp8 KV on a CPU worker (make_isvc's default: gpus 0) is an impossible combination
        (make_isvc(engine={"kvCacheDtype": "fp8"}), "spec.engine.kvCacheDtype"),
        (make_isvc(resources={"gpus": 1}, engine={"kvCacheDtype": "int4"}), "spec.engine.kvCacheDtype"),
        # FP8 weights on a CPU worker: the worker would refuse them at startup
        (make_isvc(engine={"quantization": "fp8"}), "spec.engine.quantization"),
        (make_isvc(name="x" * 51), "metadata.name"),
        (make_isvc(name="Upper"), "metadata.name"),
        (
            {"apiVersion": "inferfleet.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "a"}},
            "spec",
        ),
    ],
)
def test_bad_specs_are_user_errors(isvc: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as info:
        plan(isvc)
    assert info.value.field == field


def test_integer_quantities_render_as_strings() -> None:
    """resources.cpu / memory admit unquoted integers (as core Kubernetes does); the pod gets the
    quantity as a string, like the quoted form."""
    objs = plan(make_isvc(resources={"gpus": 0, "cpu": 8, "memory": 17179869184}))
    res = worker(objs)["containers"][0]["resources"]
    assert res["requests"]["cpu"] == "8" and res["requests"]["memory"] == "17179869184"
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)


def test_max_model_len_only_when_set() -> None:
    """engine.maxModelLen has no default: unset, the worker gets no flag and serves the model's own
    context limit (a fixed default would crash-loop a model with a shorter one); set, it is passed."""
    args = worker(plan(make_isvc()))["containers"][0]["args"]
    assert "--max-model-len" not in args
    args = worker(plan(make_isvc(engine={"maxModelLen": 2048})))["containers"][0]["args"]
    assert args[args.index("--max-model-len") + 1] == "2048"
    assert args.index("--dtype") < args.index("--max-model-len") < args.index("--max-num-seqs")


def test_drift_check_compares_quantities_by_amount() -> None:
    """The API server stores requests/limits and sizeLimit in canonical form; the drift check
    compares those by amount (the exa suffixes included, which the check once took for exponents
    and failed on), and everything else as written."""
    from inferfleet.operator.reconcile import is_subset

    def res(**limits: Any) -> dict[str, Any]:
        return {"resources": {"limits": limits}}

    assert is_subset(res(memory="1024Mi"), res(memory="1Gi"))
    assert is_subset(res(cpu="0.5"), res(cpu="500m"))
    assert is_subset(res(memory="1Ei"), res(memory=str(2**60)))
    assert is_subset(res(memory="1E"), res(memory="1000P"))
    assert not is_subset(res(memory="1Gi"), res(memory="1G"))
    assert not is_subset({"image": "0.5"}, {"image": "500m"})  # not a quantity field
