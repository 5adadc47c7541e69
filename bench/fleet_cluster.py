"""The fleet as discrete events: GPU nodes, worker and balloon pods, and the operator's autoscaler.

Semantics follow operator/ (read, not guessed):
- worker pods = spec.replicas + warmPool (spec.py `worker_pods`); the Service selects every ready
  worker pod (plan.py `build_service`), so warm pods serve traffic like any other;
- every `intervalSeconds` the operator calls `inferfleet.operator.autoscaler.decide` with load =
  waiting + running summed over the ready pods, current = spec.replicas (fleet.py `_autoscale`);
  with no ready pod there is no load (None): it holds;
- scale-down deletes pods in the ReplicaSet's order: unscheduled, then not ready, then the most
  recently ready; a deleted ready pod leaves the endpoints at once and drains what it holds;
- readiness: the start-up probe on /health/ready every `periodSeconds` of pods.py `probes`
  (10 s) gates the pod, then the endpoint is published (`endpoint_lag_s`);
- balloons (priority -1, grace 0) hold one GPU node each and pull the worker image as an init
  container (plan.py `build_balloon_deployment`); a worker that finds no free node preempts one,
  and the evicted balloon, pending again, makes the cluster autoscaler add a node;
- the pre-pull DaemonSet pulls the worker image on every GPU node as soon as the node is Ready,
  `prepull_head_start_s` before its GPU is allocatable.
One GPU per worker and one GPU per node. A node with no GPU pod is removed after `node_idle_s`;
nodes count GPU time from the provisioning request to removal, whatever holds them.

`activator=True` is a request buffer that reports its queue as load, the way KubeAI's proxy and
Knative's activator do. The operator has none: its CRD refuses autoscaling with minReplicas 0 and
warmPool 0 because no pod would report load. The simulator offers it to price true scale-to-zero.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import math
from typing import Any

from fleet_params import FleetParams, StepModel
from fleet_worker import Engine, Request
from inferfleet.operator import pods as op_pods
from inferfleet.operator.autoscaler import Decision, Policy, State, decide, policy_for
from inferfleet.operator.spec import ServiceSpec

INF = math.inf
_GOLDEN = 0.6180339887498949


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    spec: ServiceSpec  # the operator's typed view of the InferenceService
    activator: bool = False
    note: str = ""

    def policy(self) -> Policy:
        """The operator's own: operator/fleet.py `_autoscale` uses `policy_for` too."""
        return policy_for(self.spec)

    @property
    def startup_probe_period_s(self) -> float:
        return float(op_pods.probes(self.spec)["startupProbe"]["periodSeconds"])


@dataclasses.dataclass(eq=False)
class Node:
    nid: int
    t_requested: float
    t_up: float
    t_gone: float = INF
    image_at: float = INF  # when the worker image is complete on the node (INF: not pulling)
    weights_cached: bool = False  # a worker loaded the weights here (page cache)
    pod: Pod | None = None
    idle_token: int = 0


@dataclasses.dataclass(eq=False)
class Pod:
    pid: int
    kind: str  # "worker" | "balloon"
    t_created: float
    state: str = "pending"  # pending -> (starting -> ready -> draining | holding) -> gone
    node: Node | None = None
    engine: Engine | None = None
    t_ready: float = math.nan
    drain_deadline: float = INF
    token: int = 0  # invalidates stale pod_ready events
    boundary_token: int = 0
    boundary_at: float | None = None


@dataclasses.dataclass(frozen=True)
class Tick:
    t: float
    in_flight: int  # everything not finished: queued at pods, running, buffered
    load: float | None  # what the autoscaler saw
    replicas: int  # spec.replicas after the decision
    ready: int  # ready worker pods (endpoints)
    worker_pods: int
    nodes: int  # GPU nodes up or provisioning


class Fleet:
    def __init__(
        self,
        scenario: Scenario,
        params: FleetParams,
        model: StepModel,
        requests: list[Request],
        duration_s: float,
    ) -> None:
        self.sc = scenario
        self.p = params
        self.model = model
        self.requests = requests
        self.duration_s = duration_s
        self.policy = scenario.policy()
        self.interval = float(scenario.spec.autoscaling.interval_seconds)
        self.probe_period = scenario.startup_probe_period_s
        self.drain_timeout = float(scenario.spec.drain_timeout_seconds)
        self._heap: list[tuple[float, int, str, Any, int]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self.nodes: list[Node] = []
        self.pods: list[Pod] = []
        self.endpoints: list[Pod] = []  # ready, not terminating; sorted by pid
        self.buffer: list[Request] = []  # no endpoint yet (the activator's queue)
        self.replicas = scenario.spec.min_replicas
        self.state = State()
        self.decisions: list[tuple[float, float | None, int, Decision]] = []
        self.ticks: list[Tick] = []
        self.unfinished = len(requests)
        self.counts = {
            "no_endpoint": 0,
            "drain_overrun": 0,
            "worker_starts": 0,
            "nodes_provisioned": 0,
            "preemptions": 0,
            "rejected_429": 0,
        }
        self.cold_chains: list[float] = []  # pod created -> ready, for every worker start

    # -- set-up --------------------------------------------------------------------------------
    def _steady_state(self) -> None:
        """t=0: minReplicas + warmPool workers ready and balloons holding, on warm nodes."""
        s = self.sc.spec
        for _ in range(self.replicas + s.warm_pool):
            node = self._new_node(0.0, up_at=0.0)
            node.image_at, node.weights_cached = 0.0, True
            pod = self._new_pod("worker", 0.0)
            node.pod, pod.node, pod.state = pod, node, "ready"
            pod.t_ready = 0.0
            pod.engine = self._new_engine()
            self.endpoints.append(pod)
        for _ in range(s.balloons):
            node = self._new_node(0.0, up_at=0.0)
            node.image_at = 0.0
            pod = self._new_pod("balloon", 0.0)
            node.pod, pod.node, pod.state = pod, node, "holding"

    def run(self) -> Fleet:
        self._steady_state()
        for req in self.requests:
            self._push(req.t_arrive, "arrive", req)
        self._push(0.0, "tick", None)
        while self._heap:
            t, _, kind, obj, token = heapq.heappop(self._heap)
            getattr(self, f"_on_{kind}")(t, obj, token)
        return self

    # -- events --------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, obj: Any, token: int = 0) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, obj, token))

    def _on_arrive(self, now: float, req: Request, _: int) -> None:
        if not self.endpoints:
            self.counts["no_endpoint"] += 1
        if self.buffer or not self._route(req, now):
            self.buffer.append(req)

    def _reject(self, req: Request, now: float) -> None:
        """429 with Retry-After: 1 (worker/serving.py). The openai client honours Retry-After
        and retries twice (max_retries=2); a third 429 fails the request."""
        self.counts["rejected_429"] += 1
        req.rejections += 1
        if req.rejections > self.p.client_retries:
            req.dropped = True
            self.unfinished -= 1
        else:
            self._push(now + self.p.retry_after_s, "arrive", req)

    def _on_tick(self, now: float, _: Any, __: int) -> None:
        ready = self.endpoints
        load: float | None
        if ready or self.sc.activator:
            load = float(sum(p.engine.load for p in ready if p.engine) + len(self.buffer))
        else:
            load = None
        current = self.replicas
        d = decide(self.policy, load, True, current, self.state, now)
        self.decisions.append((now, load, current, d))
        self.state = d.state
        self.replicas = d.replicas
        self._reconcile(now)
        live = self._live_workers()
        self.ticks.append(
            Tick(
                now,
                self.unfinished_in_flight(now),
                load,
                self.replicas,
                len(self.endpoints),
                len(live),
                sum(1 for n in self.nodes if n.t_gone == INF),
            )
        )
        if now + self.interval <= self.duration_s or self.unfinished:
            self._push(now + self.interval, "tick", None)

    def _on_node_up(self, now: float, node: Node, _: int) -> None:
        self._schedule(now)
        if node.pod is None:
            self._idle(node, now)

    def _on_node_idle(self, now: float, node: Node, token: int) -> None:
        if token == node.idle_token and node.pod is None and node.t_gone == INF:
            node.t_gone = now

    def _on_pod_ready(self, now: float, pod: Pod, token: int) -> None:
        if token != pod.token or pod.state != "starting":
            return
        assert pod.node is not None
        pod.state, pod.t_ready = "ready", now
        pod.node.weights_cached = True
        pod.engine = self._new_engine()
        self.cold_chains.append(now - pod.t_created)
        bisect.insort(self.endpoints, pod, key=lambda q: q.pid)
        self._release(now)

    def _on_boundary(self, now: float, pod: Pod, token: int) -> None:
        if token != pod.boundary_token:
            return
        assert pod.engine is not None
        pod.boundary_at = None
        finished = pod.engine.on_boundary(now)
        for req in finished:
            req.times_served += 1
            self.unfinished -= 1
            if now > pod.drain_deadline:
                self.counts["drain_overrun"] += 1
        self._rearm(pod)
        if finished and self.buffer:
            self._release(now)
        if pod.state == "draining" and pod.engine.idle:
            self._gone(pod, now)

    # -- routing and engines -------------------------------------------------------------------
    def _route(self, req: Request, now: float) -> bool:
        """kube-proxy (iptables mode) picks a ready endpoint uniformly at random. The activator
        forwards only to pods with a free sequence slot (capacity-aware, like Knative's) and keeps
        the rest. Returns False when the request stays buffered."""
        eligible = self.endpoints
        if self.sc.activator:
            eligible = [p for p in eligible if p.engine and p.engine.load < self.p.max_num_seqs]
        if not eligible:
            return False
        u = (req.u_route + req.rejections * _GOLDEN) % 1.0  # a retry is a new connection
        pod = eligible[min(int(u * len(eligible)), len(eligible) - 1)]
        assert pod.engine is not None
        if pod.engine.unstarted >= self.p.max_queued_requests:
            self._reject(req, now)
            return True
        req.pod = pod.pid
        pod.engine.submit(req, now)
        self._rearm(pod)
        return True

    def _release(self, now: float) -> None:
        """Forward buffered requests, oldest first, while some pod takes them."""
        i = 0
        while i < len(self.buffer) and self._route(self.buffer[i], now):
            i += 1
        del self.buffer[:i]

    def _rearm(self, pod: Pod) -> None:
        assert pod.engine is not None
        nb = pod.engine.next_boundary
        if nb != pod.boundary_at:
            pod.boundary_token += 1
            pod.boundary_at = nb
            if nb is not None:
                self._push(nb, "boundary", pod, pod.boundary_token)

    def unfinished_in_flight(self, now: float) -> int:
        return sum(p.engine.load for p in self.pods if p.engine and p.state in ("ready", "draining")) + len(
            self.buffer
        )

    # -- the Deployment (ReplicaSet) and the scheduler -----------------------------------------
    def _reconcile(self, now: float) -> None:
        want = self.replicas + self.sc.spec.warm_pool
        live = self._live_workers()
        if len(live) < want:
            for _ in range(want - len(live)):
                self._new_pod("worker", now)
                self.counts["worker_starts"] += 1
            self._schedule(now)
        elif len(live) > want:

            def rank(p: Pod) -> tuple[int, float]:
                if p.state == "pending":
                    return (0, -p.t_created)
                if p.state == "starting":
                    return (1, -p.t_created)
                return (2, -p.t_ready)

            for pod in sorted(live, key=rank)[: len(live) - want]:
                self._delete(pod, now)

    def _delete(self, pod: Pod, now: float) -> None:
        if pod.state == "ready":
            assert pod.engine is not None
            pod.state = "draining"
            pod.drain_deadline = now + self.drain_timeout
            self.endpoints.remove(pod)
            if pod.engine.idle:
                self._gone(pod, now)
        else:
            self._gone(pod, now)

    def _gone(self, pod: Pod, now: float) -> None:
        pod.state = "gone"
        pod.token += 1
        node, pod.node = pod.node, None
        if node is not None:
            node.pod = None
            self._schedule(now)
            if node.pod is None:
                self._idle(node, now)

    def _idle(self, node: Node, now: float) -> None:
        node.idle_token += 1
        self._push(now + self.p.node_idle_s, "node_idle", node, node.idle_token)

    def _schedule(self, now: float) -> None:
        """Bind pending pods (workers first, by priority) to free nodes, preempting balloons for
        workers; then let the cluster autoscaler add one node per pod still pending."""
        pending = [p for p in self.pods if p.state == "pending"]
        workers = [p for p in pending if p.kind == "worker"]
        balloons = [p for p in pending if p.kind == "balloon"]
        for pod in workers:
            node = self._free_node(now)
            if node is not None:
                self._bind(pod, node, now)
                continue
            held = [
                p for p in self.pods if p.kind == "balloon" and p.state == "holding" and p.node is not None
            ]
            if held:
                victim = min(held, key=lambda b: (b.node.image_at, b.pid))  # type: ignore[union-attr]
                node = victim.node
                assert node is not None
                victim.state, victim.node = "pending", None
                node.pod = None
                self.counts["preemptions"] += 1
                balloons.append(victim)
                self._bind(pod, node, now + self.p.preempt_s)
        for pod in balloons:
            if pod.state != "pending":
                continue
            node = self._free_node(now)
            if node is not None:
                self._bind(pod, node, now)
        waiting = sum(1 for p in self.pods if p.state == "pending")
        coming = sum(1 for n in self.nodes if n.t_up > now and n.t_gone == INF)
        for _ in range(waiting - coming):
            node = self._new_node(now, up_at=now + self.p.node_provision_s)
            self.counts["nodes_provisioned"] += 1
            self._push(node.t_up, "node_up", node)

    def _free_node(self, now: float) -> Node | None:
        free = [n for n in self.nodes if n.pod is None and n.t_up <= now and n.t_gone == INF]
        if not free:
            return None
        # the scheduler's ImageLocality score: a node that has the image wins
        return min(free, key=lambda n: (n.image_at, not n.weights_cached, n.nid))

    def _bind(self, pod: Pod, node: Node, t: float) -> None:
        node.pod, pod.node = pod, node
        node.idle_token += 1
        node.image_at = min(node.image_at, t + self.p.image_pull_s)
        if pod.kind == "balloon":
            pod.state = "holding"
            return
        pod.state = "starting"
        pod.token += 1
        container = max(t, node.image_at)
        engine_ready = container + self.p.worker_start_s(node.weights_cached)
        probe_ok = container + math.ceil((engine_ready - container) / self.probe_period) * self.probe_period
        self._push(probe_ok + self.p.endpoint_lag_s, "pod_ready", pod, pod.token)

    def _new_node(self, now: float, up_at: float) -> Node:
        node = Node(next(self._ids), now, up_at)
        if self.sc.spec.prepull_enabled:
            node.image_at = up_at - self.p.prepull_head_start_s + self.p.image_pull_s
        self.nodes.append(node)
        return node

    def _new_pod(self, kind: str, now: float) -> Pod:
        pod = Pod(next(self._ids), kind, now)
        self.pods.append(pod)
        return pod

    def _new_engine(self) -> Engine:
        return Engine(self.model, self.p.max_num_seqs, self.p.max_batched_tokens)

    def _live_workers(self) -> list[Pod]:
        """Worker pods the Deployment counts: pending, starting or ready (not draining or gone)."""
        return [p for p in self.pods if p.kind == "worker" and p.state in ("pending", "starting", "ready")]

    # -- accounting ------------------------------------------------------------------------------
    def gpu_hours(self) -> float:
        """GPU-hours of every node over the trace window [0, duration]."""
        T = self.duration_s
        return sum(max(0.0, min(n.t_gone, T) - min(n.t_requested, T)) for n in self.nodes) / 3600.0
