"""kmock's KubernetesEmulator, extended into enough of an API server for kopf and our operator.

kmock stores objects and serves discovery; a real API server also keeps object metadata, filters
by label, versions and replays watches, separates the status and scale subresources, applies
server-side-apply patches, garbage-collects dependents and enforces RBAC. This subclass adds
those over real HTTP on loopback, in place of envtest (no kube-apiserver binaries here):

- resource quantities (requests/limits, emptyDir sizeLimit) stored in canonical form
  ("0.5" -> "500m", "1024Mi" -> "1Gi"), as a real API server does;
- metadata: uid, resourceVersion (one global counter), generation (bumped on spec changes),
  creationTimestamp, generateName; no-op writes change nothing and emit no event;
- list/watch: labelSelector (=, ==, !=, in, notin, exists, !exists), fieldSelector on
  metadata.name/namespace, watch from a resourceVersion (replayed from an event log),
  timeoutSeconds;
- PATCH as merge, JSON (422 when a `test` fails), strategic (approximated by merge) and
  apply (server-side apply: create if absent; fields the manager stops applying are removed;
  lists replaced whole, which is what a sole manager sees);
- status and scale subresources (the scale paths come from the CRD); CRDs created through
  the API become served resources;
- finalizers and deletionTimestamp; ownerReference cascade (background) deletion;
- RBAC: requests bearing `operator_token` are checked against ClusterRole-style rules, and so
  is setting blockOwnerDeletion (OwnerReferencesPermissionEnforcement: `update` on the owner's
  `finalizers` subresource);
- optionally, a toy Deployment controller that keeps one pod per replica (not ready, no IP)
  and replaces pods whose template changed, so tests can mark pods ready like a kubelet.

It is a test double for an API server, not a cluster: no scheduler, kubelet or admission.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import decimal
import functools
import gzip
import importlib.resources
import itertools
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml

Obj = dict[str, Any]
Res = tuple[str, str, str]  # group, version, plural
Key = tuple[Res, str | None, str]  # resource, namespace, name
TEMPLATE_ANNOTATION = "emulator.kmock/template"


@functools.cache
def _builtin_resources() -> str:
    """kmock's bundled discovery data (built-in kinds), read without its deprecated loader."""
    data = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
    return gzip.decompress(data).decode()


def parse_resource(spec: str) -> Res:
    """'apps/v1/deployments' or 'v1/pods' -> (group, version, plural)."""
    parts = spec.split("/")
    return ("", parts[0], parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])


def api_version(res: Res) -> str:
    return f"{res[0]}/{res[1]}" if res[0] else res[1]


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(base: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, Mapping) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _remove_unapplied(obj: Any, old_applied: Any, new_applied: Any) -> Any:
    """Drop from `obj` the dict keys a manager applied before but no longer applies."""
    if not (isinstance(obj, dict) and isinstance(old_applied, Mapping)):
        return obj
    new_applied = new_applied if isinstance(new_applied, Mapping) else {}
    for k, v in old_applied.items():
        if k not in new_applied:
            obj.pop(k, None)
        elif k in obj:
            obj[k] = _remove_unapplied(obj[k], v, new_applied[k])
    return obj


_REQ = re.compile(r"^\s*([^\s!=]+)\s*(==|=|!=)\s*(\S*)\s*$")
_SET = re.compile(r"^\s*(\S+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


@attrs.frozen
class Requirement:
    key: str
    op: str  # in, notin, exists, !exists (= and != are in/notin over one value)
    values: frozenset[str] = frozenset()

    def __call__(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        found = labels.get(self.key) in self.values
        return found if self.op == "in" else not found


def label_matcher(selector: str | None) -> Any:
    """A predicate over a labels dict for a Kubernetes label selector string."""
    reqs: list[Requirement] = []
    for part in re.split(r",(?![^(]*\))", selector or ""):
        if m := _SET.match(part):
            reqs.append(
                Requirement(m.group(1), m.group(2), frozenset(v.strip() for v in m.group(3).split(",")))
            )
        elif m := _REQ.match(part):
            reqs.append(
                Requirement(m.group(1), "notin" if m.group(2) == "!=" else "in", frozenset([m.group(3)]))
            )
        elif part.strip().startswith("!"):
            reqs.append(Requirement(part.strip()[1:], "!exists"))
        elif part.strip():
            reqs.append(Requirement(part.strip(), "exists"))
    return lambda labels: all(r(labels) for r in reqs)


_QTY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?$")
_BINARY = {"": 0, "Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def canonical_quantity(value: Any) -> Any:
    """A resource quantity the way the API server stores it: the largest suffix of the input's
    kind (binary or decimal SI) that keeps the number whole ("0.5" -> "500m", "1.5Gi" -> "1536Mi",
    "1024Mi" -> "1Gi"). Anything else comes back as it was."""
    m = _QTY.match(str(value)) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    if m is None:
        return value
    number, suffix = decimal.Decimal(m.group(1)), m.group(2) or ""
    if suffix in _BINARY and suffix:
        amount = number * 2 ** _BINARY[suffix]
        for name, bits in sorted(_BINARY.items(), key=lambda kv: -kv[1]):
            if amount % 2**bits == 0:
                return f"{int(amount / 2**bits)}{name}"
        return value  # a fraction of a byte: left alone
    amount = number * decimal.Decimal(10) ** _DECIMAL[suffix]
    for name, exp in sorted(_DECIMAL.items(), key=lambda kv: -kv[1]):
        scaled = amount / decimal.Decimal(10) ** exp
        if scaled == scaled.to_integral_value():
            return f"{int(scaled)}{name}"
    return value


def _canonical_quantities(obj: Any) -> None:
    """Rewrite, in place, the quantities of requests/limits maps and emptyDir sizeLimits anywhere
    in `obj` into their canonical form (what a real API server returns on read)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("requests", "limits") and isinstance(v, dict):
                obj[k] = {name: canonical_quantity(q) for name, q in v.items()}
            elif k == "sizeLimit":
                obj[k] = canonical_quantity(v)
            else:
                _canonical_quantities(v)
    elif isinstance(obj, list):
        for v in obj:
            _canonical_quantities(v)


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={"message": message})


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    operator_token: str = "operator"
    rbac_rules: list[Obj] | None = None  # ClusterRole rules applied to operator_token requests
    simulate_deployments: bool = False
    server_version: str = "1.33"

    store: dict[Key, Obj] = attrs.field(factory=dict, init=False)
    audit: list[tuple[str, str, str, str]] = attrs.field(factory=list, init=False)  # who, verb, group, res
    denied: list[tuple[str, str, str]] = attrs.field(factory=list, init=False)
    creations: dict[Key, int] = attrs.field(factory=dict, init=False)
    _rv: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _last_rv: int = attrs.field(default=0, init=False)
    _log: list[tuple[int, Res, Obj]] = attrs.field(factory=list, init=False)
    _watchers: list[tuple[Res, str | None, Any, asyncio.Queue[Obj]]] = attrs.field(factory=list, init=False)
    _applied: dict[tuple[Key, str], Obj] = attrs.field(factory=dict, init=False)
    _scale_paths: dict[Res, Obj] = attrs.field(factory=dict, init=False)
    _syncing: set[Key] = attrs.field(factory=set, init=False)
    # (verb, plural) -> an event the request waits for: lets a test stop the operator mid-request.
    holds: dict[tuple[str, str], asyncio.Event] = attrs.field(factory=dict, init=False)
    held: list[tuple[str, str, str | None]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_data(_builtin_resources())
        self._scale_paths[("apps", "v1", "deployments")] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
        }
        for ns in ("default", "kube-system"):
            self.put("v1/namespaces", {"metadata": {"name": ns}})

    async def _serve_server_version(self, request: kmock.Request) -> Obj:
        major, minor = self.server_version.split(".")
        return {"major": major, "minor": minor, "gitVersion": f"v{self.server_version}.0-kmock"}

    # ----------------------------------------------------------------- direct (test) access

    def put(self, resource: str, obj: Obj) -> Obj:
        """Create an object as an admin would (no RBAC), returning the stored copy."""
        res = parse_resource(resource)
        ns = obj.get("metadata", {}).get("namespace")
        return copy.deepcopy(self._create(res, ns if self._namespaced(res) else None, copy.deepcopy(obj)))

    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        obj = self.store.get((parse_resource(resource), namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, resource: str, namespace: str | None = None, selector: str | None = None) -> list[Obj]:
        match = label_matcher(selector)
        selected = self._select(
            parse_resource(resource), namespace, lambda meta: match(meta.get("labels") or {})
        )
        return [copy.deepcopy(obj) for obj in selected]

    def patch(
        self, resource: str, namespace: str | None, name: str, patch: Obj, *, status: bool = False
    ) -> Obj:
        res = parse_resource(resource)
        key = (res, namespace, name)
        old = self._require(key)
        return copy.deepcopy(
            self._update(key, merge_patch(old, patch), subresource="status" if status else None)
        )

    def remove(self, resource: str, namespace: str | None, name: str) -> None:
        self._delete((parse_resource(resource), namespace, name), None)

    def set_pod_ready(self, namespace: str, name: str, ready: bool = True, ip: str = "127.0.0.1") -> Obj:
        cond = {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": _now()}
        status = {"phase": "Running", "podIP": ip, "conditions": [cond]}
        return self.patch("v1/pods", namespace, name, {"status": status}, status=True)

    # ----------------------------------------------------------------- the HTTP API

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        r = request.resource
        if r is None or r.plural is None or r.group is None or r.version is None:
            return await super()._handle(request)  # discovery: /api, /apis, /version ...
        res: Res = (r.group, r.version, r.plural)
        if not self._known(res):
            raise _error(404, "NotFound", f"the server could not find the requested resource {res}")
        method = request.method.value if hasattr(request.method, "value") else str(request.method)
        params = dict(request.params)
        ns, name, sub = request.namespace, request.name, request.subresource
        if method == "GET":
            verb = "watch" if params.get("watch") in ("true", "1") else ("get" if name else "list")
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, "?")
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        self._authorize(request, verb, res, sub, creating=self._apply_creates(res, ns, name, content_type))
        if verb in ("create", "update", "patch") and sub is None:
            self._authorize_owner_references(request)
        hold = self.holds.get((verb, res[2]))
        if hold is not None:
            self.held.append((verb, res[2], name))
            await hold.wait()
        if verb == "watch":
            return await self._watch(request, res, ns, params)
        if verb == "list":
            return self._json(self._list(res, ns, params))
        if name is None:
            if verb != "create":
                raise _error(405, "MethodNotAllowed", f"{method} needs an object name")
            body = self._body(request)
            return self._json(self._create(res, ns if self._namespaced(res) else None, body), 201)
        key: Key = (res, ns if self._namespaced(res) else None, name)
        if verb == "get":
            return self._json(self._read(key, sub))
        if verb == "delete":
            body = request.data if isinstance(request.data, Mapping) else {}
            return self._json(self._delete(key, (body.get("preconditions") or {}).get("uid")))
        if verb == "update":
            return self._json(self._replace(key, self._body(request), sub))
        if verb == "patch":
            return self._json(self._patch(key, request, content_type, params, sub))
        raise _error(405, "MethodNotAllowed", method)

    def _json(self, obj: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.json_response(obj, status=status)

    def _body(self, request: kmock.Request) -> Obj:
        data = request.data
        if not isinstance(data, Mapping):
            try:
                data = yaml.safe_load(request.text)
            except yaml.YAMLError as e:
                raise _error(400, "BadRequest", f"cannot parse body: {e}") from e
        if not isinstance(data, Mapping):
            raise _error(400, "BadRequest", "the body must be an object")
        return copy.deepcopy(dict(data))

    def _authorize(
        self, request: kmock.Request, verb: str, res: Res, sub: str | None, *, creating: bool
    ) -> None:
        auth = request.headers.get("Authorization", "")
        who = "operator" if auth == f"Bearer {self.operator_token}" else "admin"
        resource = f"{res[2]}/{sub}" if sub else res[2]
        verbs = [verb, "create"] if creating else [verb]
        for v in verbs:
            self.audit.append((who, v, res[0], resource))
            if who == "operator" and self.rbac_rules is not None and not self._allowed(v, res[0], resource):
                self.denied.append((v, res[0], resource))
                raise _error(403, "Forbidden", f'cannot {v} resource "{resource}" in API group "{res[0]}"')

    def _authorize_owner_references(self, request: kmock.Request) -> None:
        """The OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift and many
        hardened clusters): setting blockOwnerDeletion on an owner reference needs `update` on
        the owner's `finalizers` subresource, checked like any other grant."""
        data = request.data
        if not isinstance(data, Mapping):
            try:
                data = yaml.safe_load(request.text or "")
            except yaml.YAMLError:
                return  # the handler answers 400 for the body
        meta = data.get("metadata") if isinstance(data, Mapping) else None
        refs = meta.get("ownerReferences") if isinstance(meta, Mapping) else None
        for ref in refs or []:
            if not ref.get("blockOwnerDeletion"):
                continue
            group, _, version = str(ref.get("apiVersion", "")).rpartition("/")
            owner = next(
                (
                    (r.group, r.version, r.plural)
                    for r, info in self.resources.items()
                    if (r.group, r.version) == (group, version) and info.kind == ref.get("kind")
                ),
                None,
            )
            if owner is not None:
                self._authorize(request, "update", owner, "finalizers", creating=False)

    def _allowed(self, verb: str, group: str, resource: str) -> bool:
        return any(
            group in rule.get("apiGroups", [])
            and resource in rule.get("resources", [])
            and verb in rule.get("verbs", [])
            for rule in self.rbac_rules or []
        )

    def _apply_creates(self, res: Res, ns: str | None, name: str | None, content_type: str) -> bool:
        if content_type != "application/apply-patch+yaml" or name is None:
            return False
        return (res, ns if self._namespaced(res) else None, name) not in self.store

    # ----------------------------------------------------------------- resources

    def _known(self, res: Res) -> bool:
        return kmock.resource(*res) in self.resources

    def _info(self, res: Res) -> Any:
        return self.resources[kmock.resource(*res)]

    def _namespaced(self, res: Res) -> bool:
        return bool(self._info(res).namespaced)

    def _has_status(self, res: Res) -> bool:
        return "status" in self._info(res).subresources

    def _register_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            res = (spec["group"], version["name"], spec["names"]["plural"])
            subresources = set(version.get("subresources") or {})
            self.resources[kmock.resource(*res)] = kmock.ResourceInfo(
                kind=spec["names"]["kind"],
                singular=spec["names"].get("singular"),
                namespaced=spec["scope"] == "Namespaced",
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                shortnames=set(spec["names"].get("shortNames") or []),
                categories=set(spec["names"].get("categories") or []),
                subresources=subresources,
            )
            if "scale" in subresources:
                self._scale_paths[res] = version["subresources"]["scale"]

    # ----------------------------------------------------------------- storage

    def _require(self, key: Key) -> Obj:
        obj = self.store.get(key)
        if obj is None:
            raise _error(404, "NotFound", f'{key[0][2]} "{key[2]}" not found')
        return obj

    def _emit(self, res: Res, event_type: str, obj: Obj) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        event = {"type": event_type, "object": copy.deepcopy(obj)}
        self._log.append((rv, res, event))
        for w_res, w_ns, w_match, queue in self._watchers:
            if self._event_matches(res, obj, w_res, w_ns, w_match):
                queue.put_nowait(copy.deepcopy(event))

    @staticmethod
    def _event_matches(res: Res, obj: Obj, w_res: Res, w_ns: str | None, w_match: Any) -> bool:
        meta = obj["metadata"]
        return res == w_res and (w_ns is None or meta.get("namespace") == w_ns) and w_match(meta)

    def _stamp(self, obj: Obj) -> None:
        self._last_rv = next(self._rv)
        obj["metadata"]["resourceVersion"] = str(self._last_rv)

    def _create(self, res: Res, ns: str | None, body: Obj) -> Obj:
        meta = body.setdefault("metadata", {})
        if self._namespaced(res):
            if meta.get("namespace") not in (None, ns) and ns is not None:
                raise _error(400, "BadRequest", "the namespace of the object does not match the URL")
            ns = ns or meta.get("namespace")
            if not ns:
                raise _error(400, "BadRequest", "a namespaced object needs a namespace")
            meta["namespace"] = ns
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _error(422, "Invalid", "metadata.name or generateName is required")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        key: Key = (res, ns, meta["name"])
        if key in self.store:
            raise _error(409, "AlreadyExists", f'{res[2]} "{meta["name"]}" already exists')
        info = self._info(res)
        body["apiVersion"], body["kind"] = api_version(res), info.kind
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        meta.pop("deletionTimestamp", None)
        if self._has_status(res) and res != ("", "v1", "namespaces"):
            body.pop("status", None)
        _canonical_quantities(body)
        self._stamp(body)
        self.store[key] = body
        self.creations[key] = self.creations.get(key, 0) + 1
        self._emit(res, "ADDED", body)
        self._after_write(res, key)
        return body

    def _update(self, key: Key, new: Obj, *, subresource: str | None = None) -> Obj:
        res = key[0]
        old = self._require(key)
        if subresource == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        else:
            if self._has_status(res):
                new = {**new, "status": copy.deepcopy(old.get("status"))}
                if new["status"] is None:
                    del new["status"]
            meta = new.setdefault("metadata", {})
            for field in ("uid", "creationTimestamp", "deletionTimestamp", "generation", "name", "namespace"):
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
                else:
                    meta.pop(field, None)
            new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
            _canonical_quantities(new)

            def essence(o: Obj) -> Obj:
                return {k: v for k, v in o.items() if k not in ("metadata", "status", "apiVersion", "kind")}

            if essence(new) != essence(old):
                meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old  # a no-op write: no new version, no event
        self._stamp(new)
        self.store[key] = new
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key)
        self._emit(res, "MODIFIED", new)
        self._after_write(res, key)
        return new

    def _delete(self, key: Key, uid: str | None) -> Obj:
        obj = self._require(key)
        if uid and obj["metadata"].get("uid") != uid:
            raise _error(409, "Conflict", "precondition failed: UID in precondition does not match")
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = _now()
                self._stamp(new)
                self.store[key] = new
                self._emit(key[0], "MODIFIED", new)
                return new
            return obj
        return self._remove(key)

    def _remove(self, key: Key) -> Obj:
        obj = self.store.pop(key)
        self._stamp(obj)
        self._emit(key[0], "DELETED", obj)
        for k, a in [k for k in self._applied if k[0] == key]:
            self._applied.pop((k, a), None)
        uid = obj["metadata"].get("uid")
        dependents = [
            k
            for k, o in self.store.items()
            if any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences") or [])
        ]
        for dep in dependents:  # background cascade, as the garbage collector would do
            if dep in self.store:
                self._delete(dep, None)
        if key[0] == ("", "v1", "pods"):
            self._resync_owner_of(obj)
        return obj

    def _select(self, res: Res, ns: str | None, match: Any) -> list[Obj]:
        """Stored objects of `res` in namespace `ns` (None: all) whose metadata `match` accepts."""
        return [
            obj
            for (r, n, _), obj in self.store.items()
            if r == res and (ns is None or n == ns) and match(obj["metadata"])
        ]

    def _read(self, key: Key, sub: str | None) -> Obj:
        obj = self._require(key)
        if sub == "scale":
            return self._scale_view(key, obj)
        return obj

    def _list(self, res: Res, ns: str | None, params: Mapping[str, str]) -> Obj:
        items = self._select(res, ns, self._matcher(params))
        kind = self._info(res).kind
        return {
            "apiVersion": api_version(res),
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(self._last_rv)},
            "items": items,
        }

    def _matcher(self, params: Mapping[str, str]) -> Any:
        labels = label_matcher(params.get("labelSelector"))
        fields: list[tuple[str, str]] = []
        for part in filter(None, (params.get("fieldSelector") or "").split(",")):
            key, _, value = part.partition("=")
            if key not in ("metadata.name", "metadata.namespace"):
                raise _error(400, "BadRequest", f"field selector {key!r} is not supported by the emulator")
            fields.append((key.split(".")[1], value.lstrip("=")))
        return lambda meta: labels(meta.get("labels") or {}) and all(meta.get(k) == v for k, v in fields)

    async def _watch(
        self, request: kmock.Request, res: Res, ns: str | None, params: Mapping[str, str]
    ) -> Any:
        match = self._matcher(params)
        since = params.get("resourceVersion")
        queue: asyncio.Queue[Obj] = asyncio.Queue()
        if since and since != "0":
            backlog = [
                copy.deepcopy(e)
                for rv, r, e in self._log
                if rv > int(since) and self._event_matches(r, e["object"], res, ns, match)
            ]
        else:
            backlog = [{"type": "ADDED", "object": copy.deepcopy(o)} for o in self._select(res, ns, match)]
        watcher = (res, ns, match, queue)
        self._watchers.append(watcher)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        try:
            await response.prepare(request._raw_request)
            for event in backlog:
                await response.write(json.dumps(event).encode() + b"\n")
            async with asyncio.timeout(timeout):
                while True:
                    event = await queue.get()
                    await response.write(json.dumps(event).encode() + b"\n")
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._watchers.remove(watcher)
        return response

    def _patch(
        self, key: Key, request: kmock.Request, content_type: str, params: Mapping[str, str], sub: str | None
    ) -> Obj:
        res = key[0]
        if content_type == "application/apply-patch+yaml":
            manager = params.get("fieldManager")
            if not manager:
                raise _error(400, "BadRequest", "fieldManager is required for apply patches")
            applied = self._body(request)
            if sub is not None:
                raise _error(400, "BadRequest", "the emulator applies to main resources only")
            if key not in self.store:
                created = self._create(res, key[1], copy.deepcopy(applied))
                self._applied[key, manager] = applied
                return created
            old = self.store[key]
            new = merge_patch(old, applied)
            new = _remove_unapplied(new, self._applied.get((key, manager)), applied)
            self._applied[key, manager] = applied
            return self._update(key, new)
        old = self._require(key)
        if sub == "scale":
            return self._patch_scale(key, old, request, content_type)
        data = request.data
        if content_type == "application/json-patch+json":
            if not isinstance(data, list):
                raise _error(400, "BadRequest", "a JSON patch must be a list")
            try:
                new = jsonpatch.apply_patch(copy.deepcopy(old), data)
            except jsonpatch.JsonPatchTestFailed as e:
                raise _error(422, "Invalid", f"the test operation failed: {e}") from e
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise _error(422, "Invalid", str(e)) from e
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(data, Mapping):
                raise _error(400, "BadRequest", "a merge patch must be an object")
            rv = (data.get("metadata") or {}).get("resourceVersion")
            if rv is not None and rv != old["metadata"]["resourceVersion"]:
                raise _error(409, "Conflict", "the object has been modified")
            new = merge_patch(old, data)
        else:
            raise _error(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")
        return self._update(key, new, subresource=sub)

    def _replace(self, key: Key, body: Obj, sub: str | None) -> Obj:
        old = self._require(key)
        rv = body.get("metadata", {}).get("resourceVersion")
        if rv is not None and rv != old["metadata"]["resourceVersion"]:
            raise _error(409, "Conflict", "the object has been modified")
        if sub == "scale":
            return self._write_scale(key, old, int(body.get("spec", {}).get("replicas", 0)))
        if sub == "status":
            return self._update(key, {**old, "status": body.get("status")}, subresource="status")
        return self._update(key, body)

    # ----------------------------------------------------------------- scale subresource

    @staticmethod
    def _path_get(obj: Any, path: str) -> Any:
        for part in path.strip(".").split("."):
            obj = obj.get(part) if isinstance(obj, Mapping) else None
        return obj

    def _scale_view(self, key: Key, obj: Obj) -> Obj:
        paths = self._scale_paths.get(key[0])
        if paths is None:
            raise _error(404, "NotFound", "this resource has no scale subresource")
        status: Obj = {"replicas": int(self._path_get(obj, paths["statusReplicasPath"]) or 0)}
        if paths.get("labelSelectorPath"):
            selector = self._path_get(obj, paths["labelSelectorPath"])
            if selector:
                status["selector"] = selector
        meta = obj["metadata"]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta},
            "spec": {"replicas": int(self._path_get(obj, paths["specReplicasPath"]) or 0)},
            "status": status,
        }

    def _patch_scale(self, key: Key, old: Obj, request: kmock.Request, content_type: str) -> Obj:
        view = self._scale_view(key, old)
        if content_type == "application/json-patch+json":
            view = jsonpatch.apply_patch(view, request.data)
        else:
            view = merge_patch(view, request.data)
        return self._write_scale(key, old, int(view["spec"]["replicas"]))

    def _write_scale(self, key: Key, old: Obj, replicas: int) -> Obj:
        path = self._scale_paths[key[0]]["specReplicasPath"].strip(".").split(".")
        new = copy.deepcopy(old)
        target = new
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = replicas
        return self._scale_view(key, self._update(key, new))

    # ----------------------------------------------------------------- controllers

    def _after_write(self, res: Res, key: Key) -> None:
        if res == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._register_crd(self.store[key])
        if not self.simulate_deployments:
            return
        if res == ("apps", "v1", "deployments"):
            self._sync_deployment(key)
        elif res == ("", "v1", "pods"):
            self._resync_owner_of(self.store[key])

    def _resync_owner_of(self, pod: Obj) -> None:
        if not self.simulate_deployments:
            return
        for ref in pod["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "Deployment":
                key: Key = (("apps", "v1", "deployments"), pod["metadata"]["namespace"], ref["name"])
                if key in self.store and self.store[key]["metadata"]["uid"] == ref.get("uid"):
                    self._sync_deployment(key)

    def _sync_deployment(self, key: Key) -> None:
        """One pod per replica from the current template; pods of an older template go at once."""
        if key in self._syncing or key not in self.store:
            return
        self._syncing.add(key)
        try:
            self._sync_deployment_once(key)
        finally:
            self._syncing.discard(key)

    def _sync_deployment_once(self, key: Key) -> None:
        deploy = self.store[key]
        if deploy["metadata"].get("deletionTimestamp"):
            return
        ns, uid = key[1], deploy["metadata"]["uid"]
        template = deploy["spec"]["template"]
        template_hash = json.dumps(template, sort_keys=True)
        pods_res: Res = ("", "v1", "pods")

        def owned() -> list[tuple[Key, Obj]]:
            return [
                (k, o)
                for k, o in self.store.items()
                if k[0] == pods_res
                and k[1] == ns
                and any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])
            ]

        for k, o in owned():
            if o["metadata"].get("annotations", {}).get(TEMPLATE_ANNOTATION) != template_hash:
                self._remove(k)
        want = int(deploy["spec"].get("replicas", 1))
        for k, _ in owned()[want:]:
            self._remove(k)
        for _ in range(want - len(owned())):
            meta = copy.deepcopy(template.get("metadata") or {})
            meta.setdefault("annotations", {})[TEMPLATE_ANNOTATION] = template_hash
            meta.update(
                generateName=f"{key[2]}-",
                namespace=ns,
                ownerReferences=[
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": key[2],
                        "uid": uid,
                        "controller": True,
                    }
                ],
            )
            pod = self._create(pods_res, ns, {"metadata": meta, "spec": copy.deepcopy(template["spec"])})
            self.patch("v1/pods", ns, pod["metadata"]["name"], {"status": {"phase": "Pending"}}, status=True)
        ready = sum(
            1
            for _, o in owned()
            if any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in o.get("status", {}).get("conditions", [])
            )
        )
        status = {
            "replicas": want,
            "readyReplicas": ready,
            "observedGeneration": deploy["metadata"]["generation"],
        }
        if self.store[key].get("status") != status:
            self._update(key, {**self.store[key], "status": status}, subresource="status")

    def pods_of(self, namespace: str, selector: str) -> list[Obj]:
        return self.list("v1/pods", namespace, selector)
