"""A small async Kubernetes API client for the operator's own calls (kopf has its own).

It speaks plain REST over aiohttp with the credentials kopf's login produced, applies children
with server-side apply (one idempotent PATCH creates or updates, and fields the operator stops
setting are removed), and refuses any call not declared in `rbac.RULES`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import kopf
from inferfleet.operator import crd, rbac


@dataclasses.dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        out = f"{root}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            out += f"/{name}"
        if subresource is not None:
            out += f"/{subresource}"
        return out


DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
DAEMONSETS = Resource("apps", "v1", "daemonsets", "DaemonSet")
SERVICES = Resource("", "v1", "services", "Service")
PDBS = Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
PODS = Resource("", "v1", "pods", "Pod")
ISVCS = Resource(crd.GROUP, crd.VERSION, crd.PLURAL, crd.KIND)

_BY_KIND = {(r.api_version, r.kind): r for r in (DEPLOYMENTS, DAEMONSETS, SERVICES, PDBS, PODS, ISVCS)}


def resource_of(api_version: str, kind: str) -> Resource:
    return _BY_KIND[api_version, kind]


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        """Conflicts, throttling and server trouble pass; 4xx spec errors need a spec change."""
        return self.status in (409, 429) or self.status >= 500


class UndeclaredCall(RuntimeError):
    """A call missing from rbac.RULES: a bug, caught by tests before a cluster refuses it."""


class KubeClient:
    def __init__(
        self,
        connection: Callable[[], kopf.ConnectionInfo | None],
        *,
        field_manager: str,
        timeout_s: float = 30.0,
    ) -> None:
        self._connection = connection
        self._field_manager = field_manager
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._session_for: kopf.ConnectionInfo | None = None
        self._allowed = rbac.declared()

    def _check(self, resource: Resource, verb: str, subresource: str | None = None) -> None:
        plural = f"{resource.plural}/{subresource}" if subresource else resource.plural
        if rbac.Permission(resource.group, plural, verb) not in self._allowed:
            raise UndeclaredCall(f"{verb} {resource.group or 'core'}/{plural} is not in rbac.RULES")

    async def _client(self) -> tuple[aiohttp.ClientSession, str]:
        info = self._connection()
        if info is None:
            raise ApiError(401, "NotLoggedIn", "no credentials from kopf's login yet")
        if self._session is None or self._session_for is not info:  # re-login swaps the object
            if self._session is not None:
                await self._session.close()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
                headers={**info.as_http_headers(), "User-Agent": "inferfleet-operator"},
                timeout=self._timeout,
            )
            self._session_for = info
        return self._session, info.server.rstrip("/")

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        session, server = await self._client()
        data = None if body is None else json.dumps(body)
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        async with session.request(method, server + path, params=params, data=data, headers=headers) as resp:
            text = await resp.text()
            if resp.status >= 400:
                try:
                    status = json.loads(text)
                except ValueError:
                    status = {}
                raise ApiError(
                    resp.status, str(status.get("reason", resp.reason)), str(status.get("message", text))
                )
            return json.loads(text) if text else {}

    async def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        self._check(resource, "get")
        try:
            return await self._request("GET", resource.path(namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, resource: Resource, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        self._check(resource, "list")
        out = await self._request("GET", resource.path(namespace), params={"labelSelector": label_selector})
        return list(out.get("items") or [])

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply: creates the object or updates the fields this manager owns."""
        resource = resource_of(obj["apiVersion"], obj["kind"])
        self._check(resource, "create")
        self._check(resource, "patch")
        meta = obj["metadata"]
        return await self._request(
            "PATCH",
            resource.path(meta["namespace"], meta["name"]),
            params={"fieldManager": self._field_manager, "force": "true"},
            body=obj,
            content_type="application/apply-patch+yaml",
        )

    async def delete(self, resource: Resource, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete (background propagation); False if already gone. `uid` guards against
        deleting a same-named successor."""
        self._check(resource, "delete")
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self._request("DELETE", resource.path(namespace, name), body=body)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def patch_status(
        self, resource: Resource, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        self._check(resource, "patch", "status")
        return await self._request(
            "PATCH",
            resource.path(namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    async def patch_scale(
        self, resource: Resource, namespace: str, name: str, replicas: int
    ) -> dict[str, Any]:
        self._check(resource, "patch", "scale")
        return await self._request(
            "PATCH",
            resource.path(namespace, name, "scale"),
            body={"spec": {"replicas": replicas}},
            content_type="application/merge-patch+json",
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
            self._session_for = None
