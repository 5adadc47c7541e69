"""kopf wiring: thin handlers over the plan (pure), reconcile (apply) and fleet (status, scaling).

    InferenceService  create/update(spec)/resume -> apply children, prune, wake the daemon
                      daemon                     -> status, autoscaler, periodic drift check
    children (ours)   any event                  -> restore the child if deleted or edited
    worker pods       any event                  -> wake the owner's daemon (readiness changed)

`build_registry(config)` returns a fresh registry per operator run, so tests can run, stop and
restart the operator in one process with different settings and no shared module state.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import aiohttp
import kopf
from inferfleet.operator import crd, labels
from inferfleet.operator.config import OperatorConfig
from inferfleet.operator.fleet import Fleet
from inferfleet.operator.kube import (
    DAEMONSETS,
    DEPLOYMENTS,
    ISVCS,
    PDBS,
    PODS,
    SERVICES,
    ApiError,
    KubeClient,
    Resource,
)
from inferfleet.operator.plan import ChildRef, plan_spec
from inferfleet.operator.reconcile import apply_children, essence, owner_name, restore_one
from inferfleet.operator.spec import ServiceSpec, SpecError

CHILD_RESOURCES = (DEPLOYMENTS, DAEMONSETS, SERVICES, PDBS)
MANAGED = {labels.MANAGED_BY: labels.MANAGER}
WORKER_PODS = {labels.MANAGED_BY: labels.MANAGER, labels.COMPONENT: labels.WORKER}


def _selector(r: Resource) -> tuple[str, ...]:
    return (r.group, r.version, r.plural) if r.group else (r.version, r.plural)


def configure_settings(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    settings.watching.server_timeout = config.watch_server_timeout_s
    settings.watching.client_timeout = config.watch_client_timeout_s
    settings.watching.connect_timeout = 10.0
    settings.networking.request_timeout = config.request_timeout_s
    # kopf's bookkeeping stays in annotations under our own prefix: the CRD's status schema is
    # strict (no status.kopf), and no kopf.zalando.org keys leak into user objects.
    prefix = f"kopf.{crd.GROUP}"
    settings.persistence.finalizer = f"{crd.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # handler chatter stays in logs; failures become events
    # Server-side filters: watch only our children and worker pods, not every Deployment.
    for r in CHILD_RESOURCES:
        settings.watching.label_selectors[_selector(r)] = labels.match_string(MANAGED)
    settings.watching.label_selectors["v1", "pods"] = labels.match_string(WORKER_PODS)


@dataclasses.dataclass
class Credentials:
    """The ConnectionInfo kopf logged in with, shared with our own client."""

    info: kopf.ConnectionInfo | None = None


def login(config: OperatorConfig, **kwargs: Any) -> kopf.ConnectionInfo:
    if config.connection is not None:
        return config.connection
    info = kopf.login_with_service_account(**kwargs)
    if info is None:
        try:
            info = kopf.login_via_client(**kwargs)  # full kubeconfig support, exec plugins included
        except kopf.LoginError:
            info = kopf.login_with_kubeconfig(**kwargs)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig")
    return info


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    creds = Credentials()
    kube = KubeClient(
        lambda: creds.info, field_manager=config.field_manager, timeout_s=config.request_timeout_s
    )
    fleet = Fleet(kube, config)
    isvcs = (crd.GROUP, crd.VERSION, crd.PLURAL)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_settings(settings, config)

    @kopf.on.login(registry=registry)
    def authenticate(**kwargs: Any) -> kopf.ConnectionInfo:
        creds.info = login(config, **kwargs)
        return creds.info

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await fleet.close()

    @kopf.on.resume(*isvcs, registry=registry)
    @kopf.on.create(*isvcs, registry=registry)
    @kopf.on.update(*isvcs, field="spec", registry=registry)
    async def reconcile(body: kopf.Body, namespace: str, name: str, logger: kopf.Logger, **_: Any) -> None:
        rt = fleet.runtime(namespace, name)
        try:
            s = ServiceSpec.from_body(body)  # from_body copies what it keeps
        except SpecError as e:
            rt.apply_error = str(e)
            rt.wake.set()
            raise kopf.PermanentError(str(e)) from e
        async with rt.lock:
            try:
                result = await apply_children(kube, s)
            except ApiError as e:
                rt.apply_error = str(e)
                rt.wake.set()
                raise kopf.TemporaryError(str(e), delay=5 if e.retryable else 30) from e
            except (aiohttp.ClientError, TimeoutError) as e:
                raise kopf.TemporaryError(f"API unreachable: {e}", delay=5) from e
            rt.apply_error = rt.resync_error = None  # every child applied just now
            rt.applied_generation = s.generation
            rt.last_resync = config.clock()
        rt.wake.set()
        pruned = f"; pruned {', '.join(r.name for r in result.pruned)}" if result.pruned else ""
        logger.info(f"applied generation {s.generation}: {len(result.applied)} children{pruned}")

    @kopf.daemon(*isvcs, registry=registry, cancellation_timeout=10.0)
    async def service(
        stopped: kopf.DaemonStopped, namespace: str, name: str, logger: kopf.Logger, **_: Any
    ) -> None:
        await fleet.run(namespace, name, stopped, logger)

    @kopf.on.event(*_selector(PODS), labels=WORKER_PODS, registry=registry)
    async def worker_pod(body: kopf.Body, namespace: str, **_: Any) -> None:
        owner = body.metadata.labels.get(labels.SERVICE)
        if owner:
            fleet.wake(namespace, owner)

    for resource in CHILD_RESOURCES:
        _register_drift(registry, resource, kube, fleet)
    return registry


def _register_drift(
    registry: kopf.OperatorRegistry, resource: Resource, kube: KubeClient, fleet: Fleet
) -> None:
    @kopf.on.event(*_selector(resource), labels=MANAGED, registry=registry, id=f"drift-{resource.plural}")
    async def drift(
        event: kopf.RawEvent, body: kopf.Body, namespace: str, name: str, logger: kopf.Logger, **_: Any
    ) -> None:
        owner = owner_name(body)
        if owner is None:
            return
        key = (resource.plural, namespace, name)
        deleted = event.get("type") == "DELETED"
        seen = essence(body)
        if deleted:
            fleet.checked.pop(key, None)
        elif fleet.checked.get(key) == seen:
            return  # only status changed since the last check
        rt = fleet.runtime(namespace, owner)
        async with rt.lock:
            isvc = await kube.get(ISVCS, namespace, owner)
            if isvc is None or isvc["metadata"].get("deletionTimestamp"):
                fleet.checked.pop(key, None)
                return  # the owner is going away; garbage collection removes its children
            try:
                s = ServiceSpec.from_body(isvc)
            except SpecError:
                return
            ref = ChildRef(resource.api_version, resource.kind, name)
            want = {ChildRef.of(obj): obj for obj in plan_spec(s)}.get(ref)
            if want is None:
                return  # not wanted; pruning is the reconcile handler's job
            if await restore_one(kube, want, None if deleted else dict(body)):
                logger.info(f"restored {resource.kind} {name} ({'deleted' if deleted else 'edited'})")
            else:
                fleet.checked[key] = seen
