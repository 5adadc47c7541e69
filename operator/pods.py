"""Pod-level pieces of the plan: the worker container, model volumes, security, probes.

Everything here is a pure function of a `ServiceSpec`. Pods follow the Pod Security
"restricted" profile (non-root, no privilege escalation, all capabilities dropped,
RuntimeDefault seccomp, emptyDir and PVC volumes) and a read-only root filesystem, so every
writable path is an emptyDir. One exception: an oci:// model is an image volume, a type the
restricted profile does not list yet (baseline allows it); see docs/operator.md.
"""

from __future__ import annotations

import math
from typing import Any

from inferfleet.operator import contract
from inferfleet.operator.spec import ServiceSpec

Obj = dict[str, Any]

WORKER_UID = 1000
PAUSE_UID = 65535  # the pause image's own non-root user

# Runs in the worker image with the standard library only: the worker extra has no
# huggingface_hub. Fetches the files a Hugging Face checkpoint needs from the repository root
# (skipping e.g. Llama's original/*.pth duplicates); resumable through *.part renames.
HF_DOWNLOAD_SCRIPT = """\
import json, os, shutil, sys, urllib.parse, urllib.request
repo, dest = sys.argv[1], sys.argv[2]
base = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
token = os.environ.get("HF_TOKEN")
keep = (".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken")
def get(url):
    headers = {"Authorization": "Bearer " + token} if token else {}
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=120)
with get(base + "/api/models/" + repo) as r:
    files = [s["rfilename"] for s in json.load(r)["siblings"]]
os.makedirs(dest, exist_ok=True)
for name in files:
    if "/" in name or not name.endswith(keep):
        continue
    path = os.path.join(dest, name)
    if os.path.exists(path):
        continue
    with get(base + "/" + repo + "/resolve/main/" + urllib.parse.quote(name)) as r, open(path + ".part", "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    os.replace(path + ".part", path)
print("downloaded", repo, "to", dest)
"""


def container_security() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security(uid: int) -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def model_dir(s: ServiceSpec) -> str:
    src = s.source
    if src.scheme == "pvc":
        return f"{contract.MODEL_ROOT}/{src.path}" if src.path else contract.MODEL_ROOT
    if src.scheme == "oci":
        return contract.MODEL_ROOT
    if src.scheme == "hf":
        return f"{contract.MODEL_ROOT}/{src.location.replace('/', '--')}"
    return f"{contract.MODEL_ROOT}/tiny-{src.location}"


def model_volume(s: ServiceSpec) -> Obj:
    src = s.source
    if src.scheme == "pvc":
        return {"name": "model", "persistentVolumeClaim": {"claimName": src.location, "readOnly": True}}
    if src.scheme == "oci":
        # Kubernetes image volume (1.31+, feature gate ImageVolume): the kubelet pulls the
        # model image and mounts its root read-only; no container of it ever runs.
        return {"name": "model", "image": {"reference": src.location, "pullPolicy": "IfNotPresent"}}
    return {"name": "model", "emptyDir": {}}


def model_init_containers(s: ServiceSpec) -> list[Obj]:
    """Containers that fill the model emptyDir before the worker starts (hf://, tiny://)."""
    src = s.source
    mount = [
        {"name": "model", "mountPath": contract.MODEL_ROOT},
        {"name": "tmp", "mountPath": contract.TMP_DIR},
    ]
    base: Obj = {
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "securityContext": container_security(),
        "volumeMounts": mount,
        "env": [{"name": "HOME", "value": contract.TMP_DIR}],
    }
    if src.scheme == "tiny":
        return [
            {
                "name": "make-tiny-model",
                **base,
                "command": [contract.WORKER_BINARY, "make-tiny-model", model_dir(s), "--arch", src.location],
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            }
        ]
    if src.scheme == "hf":
        env = list(base["env"])
        if s.model_token is not None:
            env.append(
                {
                    "name": contract.HF_TOKEN_ENV,
                    "valueFrom": {"secretKeyRef": {"name": s.model_token.name, "key": s.model_token.key}},
                }
            )
        return [
            {
                "name": "fetch-model",
                **base,
                "env": env,
                "command": [contract.WORKER_PYTHON, "-c", HF_DOWNLOAD_SCRIPT, src.location, model_dir(s)],
                "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            }
        ]
    return []


def worker_args(s: ServiceSpec) -> list[str]:
    e = s.engine
    args = [
        "serve",
        "--model", model_dir(s),
        "--host", "0.0.0.0",
        "--port", str(contract.PORT),
        "--served-model-name", s.model_name,
        "--dtype", e.dtype,
        # unset: no flag, the worker takes the model's own limit (set: where it always stood)
        *(["--max-model-len", str(e.max_model_len)] if e.max_model_len is not None else []),
        "--max-num-seqs", str(e.max_num_seqs),
        "--block-size", str(e.block_size),
        "--gpu-memory-utilization", f"{e.gpu_memory_utilization:g}",
        "--quantization", e.quantization,
    ]  # fmt: skip
    if e.kv_cache_dtype != "auto":  # only when set: specs without it keep their template hash
        args += ["--kv-cache-dtype", e.kv_cache_dtype]
    if not e.prefix_caching:
        args.append("--no-enable-prefix-caching")
    args += ["--drain-timeout", str(s.drain_timeout_seconds)]
    return args + list(e.extra_args)


def worker_resources(s: ServiceSpec) -> Obj:
    requests: Obj = {"cpu": s.cpu, "memory": s.memory}
    # No CPU limit: throttling a tokenizer or scheduler thread stalls every sequence in the batch.
    limits: Obj = {"memory": s.memory}
    if s.gpus:
        requests[contract.GPU_RESOURCE] = str(s.gpus)
        limits[contract.GPU_RESOURCE] = str(s.gpus)
    return {"requests": requests, "limits": limits}


def probes(s: ServiceSpec) -> Obj:
    def http(path: str, period: int, failures: int, timeout: int) -> Obj:
        return {
            "httpGet": {"path": path, "port": contract.PORT_NAME},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": timeout,
        }

    # The start-up budget covers download, weight load and warm-up (CUDA graphs): liveness and
    # readiness only begin after /health/ready first answers 200, so a 70 GB model loading for
    # 20 minutes is not killed, while a load that hangs past the budget is.
    return {
        "startupProbe": http(contract.HEALTH_READY, 10, max(1, math.ceil(s.startup_timeout_seconds / 10)), 5),
        "readinessProbe": http(contract.HEALTH_READY, 5, 2, 5),
        "livenessProbe": http(contract.HEALTH_LIVE, 15, 4, 10),
    }


def worker_env(s: ServiceSpec) -> list[Obj]:
    env: list[Obj] = [
        {"name": "HOME", "value": contract.TMP_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{contract.TMP_DIR}/.cache"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if s.api_key is not None:
        env.append(
            {
                "name": contract.API_KEY_ENV,
                "valueFrom": {"secretKeyRef": {"name": s.api_key.name, "key": s.api_key.key}},
            }
        )
    return env


def scheduling_fields(s: ServiceSpec, *, node_affinity_only: bool = False) -> Obj:
    sched = s.scheduling
    out: Obj = {}
    if sched.node_selector:
        out["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        out["tolerations"] = [dict(t) for t in sched.tolerations]
    affinity = dict(sched.affinity)
    if node_affinity_only:
        affinity = {k: v for k, v in affinity.items() if k == "nodeAffinity"}
    if affinity:
        out["affinity"] = affinity
    return out


def worker_pod_spec(s: ServiceSpec) -> Obj:
    shm_limit = "1Gi" if s.gpus else "256Mi"  # NCCL and the tokenizer pool use /dev/shm
    mounts = [
        {"name": "model", "mountPath": contract.MODEL_ROOT, "readOnly": True},  # only init containers write
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": contract.TMP_DIR},
    ]
    container: Obj = {
        "name": "worker",
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": [contract.WORKER_BINARY],
        "args": worker_args(s),
        "ports": [{"name": contract.PORT_NAME, "containerPort": contract.PORT, "protocol": "TCP"}],
        "env": worker_env(s),
        "resources": worker_resources(s),
        **probes(s),
        # keep serving until the endpoints have dropped the pod, then drain (kubelet's sleep
        # action: no binary needed in the image)
        "lifecycle": {"preStop": {"sleep": {"seconds": contract.ENDPOINT_GRACE_SECONDS}}},
        "securityContext": container_security(),
        "volumeMounts": mounts,
    }
    pod: Obj = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # The preStop sleep, then the worker's drain on SIGTERM for --drain-timeout: the
        # kubelet's SIGKILL must come after both (the grace period counts from the deletion).
        "terminationGracePeriodSeconds": contract.ENDPOINT_GRACE_SECONDS + s.drain_timeout_seconds + 15,
        "securityContext": pod_security(WORKER_UID),
        **scheduling_fields(s),
        "containers": [container],
        "volumes": [
            model_volume(s),
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_limit}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}},
        ],
    }
    if s.scheduling.priority_class_name:
        pod["priorityClassName"] = s.scheduling.priority_class_name
    init = model_init_containers(s)
    if init:
        pod["initContainers"] = init
    return pod


def pull_worker_image(s: ServiceSpec) -> Obj:
    """An init container that only makes the kubelet pull the worker image, then exits."""
    return {
        "name": "pull-worker",
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": [contract.WORKER_PYTHON, "-c", "pass"],
        "resources": {"requests": {"cpu": "1m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": container_security(),
    }


def pause_container(resources: Obj, mounts: list[Obj]) -> Obj:
    out: Obj = {
        "name": "pause",
        "image": contract.PAUSE_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "resources": resources,
        "securityContext": container_security(),
    }
    if mounts:
        out["volumeMounts"] = mounts
    return out


def model_image_volume(s: ServiceSpec) -> tuple[list[Obj], list[Obj]]:
    """(volumes, mounts) that pin an oci:// model image on the node; empty for other sources.

    Model images are usually data-only (FROM scratch): there is no binary an init container
    could run, so the image is pulled through the same image-volume mechanism the worker uses.
    """
    if s.source.scheme != "oci":
        return [], []
    return [model_volume(s)], [{"name": "model", "mountPath": "/model", "readOnly": True}]
