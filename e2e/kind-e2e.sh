#!/usr/bin/env bash
# inferfleet end to end on a kind cluster: build both images (CPU worker), install the chart,
# serve the tiny example, stream a chat completion, scale it up under load, delete everything
# and check that nothing is left. Prerequisites and what each step checks: e2e/README.md.
#
#   e2e/kind-e2e.sh                 # create the cluster, run, delete the cluster
#   KEEP_CLUSTER=1 e2e/kind-e2e.sh  # keep the cluster afterwards (kind delete cluster --name ...)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${CLUSTER:-inferfleet-e2e}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.33.1@sha256:050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
NAMESPACE=inferfleet-system
RELEASE=inferfleet
# charts/inferfleet/examples/kind.yaml names this operator image (pullPolicy Never).
OPERATOR_IMAGE=inferfleet-operator:e2e
WORKER_IMAGE=inferfleet-worker:e2e-cpu
EXAMPLE="$REPO/manifests/examples/tiny-cpu.yaml"
ISVC=tiny                 # metadata.name in the example
ISVC_NAMESPACE=default    # metadata.namespace in the example
MODEL=tiny-llama          # spec.model.name in the example
LOCAL_PORT="${LOCAL_PORT:-18000}"
LOAD_STREAMS="${LOAD_STREAMS:-24}"

KCTX=(--context "kind-$CLUSTER")
PORT_FORWARD_PID=""
LOAD_PIDS=()
WORK="$(mktemp -d)"

log() { printf '\n==> %s\n' "$*" >&2; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}
k() { kubectl "${KCTX[@]}" "$@"; }

stop_background() {
    local pid
    for pid in "${LOAD_PIDS[@]}" "$PORT_FORWARD_PID"; do
        if [[ -n "$pid" ]]; then kill "$pid" 2>/dev/null || true; fi
    done
    LOAD_PIDS=()
    PORT_FORWARD_PID=""
}

on_exit() {
    local rc=$?
    stop_background
    if ((rc != 0)) && kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
        log "failed (exit $rc): state for the post-mortem"
        k get inferenceservices,deployments,pods,services -A -o wide || true
        k -n "$NAMESPACE" logs deployment/"$RELEASE"-operator --tail=200 || true
    fi
    if [[ "$KEEP_CLUSTER" != 1 ]]; then
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap on_exit EXIT

# Poll "$@" every 2 s until it succeeds or $1 seconds pass.
wait_for() {
    local timeout=$1 what=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then fail "timed out after ${timeout}s waiting for $what"; fi
        sleep 2
    done
}

chat_request() { # $1: max_tokens; prints the SSE stream
    curl -sSN --max-time 300 "http://127.0.0.1:$LOCAL_PORT/v1/chat/completions" \
        -H 'Content-Type: application/json' \
        -d "{\"model\": \"$MODEL\", \"stream\": true, \"max_tokens\": $1, \"ignore_eos\": true,
             \"messages\": [{\"role\": \"user\", \"content\": \"Say something.\"}]}"
}

start_port_forward() {
    k -n "$ISVC_NAMESPACE" port-forward "service/$ISVC" "$LOCAL_PORT:8000" >"$WORK/port-forward.log" 2>&1 &
    PORT_FORWARD_PID=$!
    wait_for 60 "the port-forward" curl -sf "http://127.0.0.1:$LOCAL_PORT/health/ready"
}

managed_left() {
    k get deployments,daemonsets,services,poddisruptionbudgets,pods -A \
        -l app.kubernetes.io/managed-by=inferfleet-operator -o name
}

# ------------------------------------------------------------------ 0. prerequisites
for cmd in docker kind kubectl helm curl; do
    command -v "$cmd" >/dev/null || fail "$cmd is not on PATH (see e2e/README.md)"
done
docker info >/dev/null 2>&1 || fail "the Docker daemon is not reachable"

# ------------------------------------------------------------------ 1. cluster
log "creating kind cluster $CLUSTER ($KIND_NODE_IMAGE)"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    fail "a kind cluster named $CLUSTER exists already (delete it or set CLUSTER=...)"
fi
kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" --wait 180s

# ------------------------------------------------------------------ 2. images
log "building $OPERATOR_IMAGE and $WORKER_IMAGE (CPU variant)"
DOCKER_BUILDKIT=1 docker build -f "$REPO/Dockerfile.operator" -t "$OPERATOR_IMAGE" "$REPO"
DOCKER_BUILDKIT=1 docker build -f "$REPO/Dockerfile.worker" --build-arg VARIANT=cpu -t "$WORKER_IMAGE" "$REPO"
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$WORKER_IMAGE"

# ------------------------------------------------------------------ 3. chart
log "installing the chart into $NAMESPACE"
k create namespace "$NAMESPACE"
k label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=restricted
helm install "$RELEASE" "$REPO/charts/inferfleet" --kube-context "kind-$CLUSTER" -n "$NAMESPACE" \
    -f "$REPO/charts/inferfleet/examples/kind.yaml" --wait --timeout 5m
k -n "$NAMESPACE" rollout status deployment/"$RELEASE"-operator --timeout=120s
k get crd inferenceservices.inferfleet.io >/dev/null
k get priorityclass inferfleet-balloon >/dev/null

# ------------------------------------------------------------------ 4. the tiny example
log "applying $EXAMPLE with image $WORKER_IMAGE"
sed "s|^  image: .*|  image: $WORKER_IMAGE|" "$EXAMPLE" >"$WORK/tiny.yaml"
grep -q "image: $WORKER_IMAGE" "$WORK/tiny.yaml" || fail "could not set spec.image in $EXAMPLE"
k apply -f "$WORK/tiny.yaml"
log "waiting for InferenceService $ISVC to be Ready"
k -n "$ISVC_NAMESPACE" wait "inferenceservice/$ISVC" --for=condition=Ready --timeout=600s
k -n "$ISVC_NAMESPACE" get inferenceservice "$ISVC"

# ------------------------------------------------------------------ 5. stream a chat completion
log "streaming a chat completion through a port-forward"
start_port_forward
chat_request 16 >"$WORK/stream.txt"
grep -q '"delta"' "$WORK/stream.txt" || fail "no delta chunk in the stream: $(head -c 500 "$WORK/stream.txt")"
tail -n 2 "$WORK/stream.txt" | grep -qx 'data: \[DONE\]' || fail "the stream did not end with [DONE]"
printf '%s chunks, ended with [DONE]\n' "$(grep -c '^data: {' "$WORK/stream.txt")"

# ------------------------------------------------------------------ 6. scale under load
# The example targets 4 requests in flight per replica (maxReplicas 3, interval 5 s): keep
# LOAD_STREAMS long generations running until the autoscaler raises spec.replicas above 1.
log "raising load: $LOAD_STREAMS concurrent streams"
for _ in $(seq "$LOAD_STREAMS"); do
    (while true; do chat_request 400 >/dev/null 2>&1 || sleep 1; done) &
    LOAD_PIDS+=($!)
done
replicas() { k -n "$ISVC_NAMESPACE" get inferenceservice "$ISVC" -o jsonpath='{.spec.replicas}'; }
grown() { (($(replicas) > 1)); }
wait_for 300 "spec.replicas > 1 under load" grown
log "the autoscaler raised spec.replicas to $(replicas)"
workers() { k -n "$ISVC_NAMESPACE" get deployment "$ISVC" -o jsonpath='{.spec.replicas}'; }
more_workers() { (($(workers) > 1)); }
wait_for 60 "the worker Deployment to follow" more_workers
stop_background

# ------------------------------------------------------------------ 7. delete and check cleanup
log "deleting the InferenceService: every child must go (owner references)"
k delete -f "$WORK/tiny.yaml" --wait --timeout=180s
nothing_left() { [[ -z "$(managed_left)" ]]; }
wait_for 180 "the operator's children to be garbage-collected" nothing_left

log "uninstalling the chart"
helm uninstall "$RELEASE" --kube-context "kind-$CLUSTER" -n "$NAMESPACE" --wait --timeout 3m
# Helm never deletes what it installed from crds/: that is the operator of the cluster's call.
k delete crd inferenceservices.inferfleet.io --wait --timeout=120s
for obj in clusterrole/"$RELEASE"-operator clusterrolebinding/"$RELEASE"-operator priorityclass/inferfleet-balloon; do
    if k get "$obj" >/dev/null 2>&1; then fail "$obj is still there after helm uninstall"; fi
done
operator_gone() { [[ -z "$(k -n "$NAMESPACE" get deployments,pods,serviceaccounts -l app.kubernetes.io/instance="$RELEASE" -o name)" ]]; }
wait_for 120 "the operator's objects to go" operator_gone
k delete namespace "$NAMESPACE" --wait --timeout=120s

log "PASS"
