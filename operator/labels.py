"""Label and annotation keys shared by the plan, the handlers and status.

Selectors use only the inferfleet.io/* keys: a Deployment's selector is immutable, and the
app.kubernetes.io/* keys are also written by Helm, Argo CD and kustomize.
"""

from __future__ import annotations

from collections.abc import Mapping

SERVICE = "inferfleet.io/service"
COMPONENT = "inferfleet.io/component"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "inferfleet-operator"
SPEC_HASH = "inferfleet.io/spec-hash"  # on every child, and on the worker pod template

WORKER = "worker"
PREPULL = "prepull"
BALLOON = "balloon"


def selector(name: str, component: str) -> dict[str, str]:
    return {SERVICE: name, COMPONENT: component}


def match_string(match_labels: Mapping[str, str]) -> str:
    """A label selector string requiring each of `match_labels` (`k1=v1,k2=v2`, keys sorted)."""
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))


def selector_string(name: str, component: str) -> str:
    return match_string(selector(name, component))


def labels(name: str, component: str) -> dict[str, str]:
    return {
        **selector(name, component),
        MANAGED_BY: MANAGER,
        "app.kubernetes.io/name": "inferfleet",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
    }
