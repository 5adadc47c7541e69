"""What the API server does with a CRD's schema before storing a custom resource, for tests:
default, validate the structural OpenAPI schema (strictly: unknown fields are errors, as with
`kubectl apply --validate=strict`), then run the CEL rules (cel-python) where their value exists.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import celpy
import jsonschema
from inferfleet.operator import crd

Schema = dict[str, Any]
_OPENAPI_ONLY = {
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "nullable",
}


def to_json_schema(schema: Mapping[str, Any]) -> Schema:
    """An OpenAPI v3 structural schema as JSON Schema, with unknown fields forbidden."""
    out: Schema = {}
    for key, value in schema.items():
        if key in _OPENAPI_ONLY or key == "x-kubernetes-preserve-unknown-fields":
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            out[key] = to_json_schema(value)
        else:
            out[key] = copy.deepcopy(value)
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out.setdefault("additionalProperties", False)
    return out


def schema_errors(obj: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> list[str]:
    schema = schema if schema is not None else crd.openapi_schema()
    validator = jsonschema.Draft202012Validator(
        to_json_schema(schema), format_checker=jsonschema.FormatChecker()
    )
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj))


def rules(
    schema: Mapping[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Mapping[str, Any]]]:
    """Every x-kubernetes-validations rule with the property path of the value it binds to `self`."""
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path, rule
    for name, sub in (schema.get("properties") or {}).items():
        yield from rules(sub, (*path, name))
    if "items" in schema:  # list items: evaluated per element (none of ours today)
        yield from rules(schema["items"], (*path, "[]"))


def _lookup(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return obj


def cel_failures(obj: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> list[str]:
    """Messages of the CEL rules `obj` (already defaulted) breaks."""
    schema = schema if schema is not None else crd.openapi_schema()
    env = celpy.Environment()
    failures: list[str] = []
    for path, rule in rules(schema):
        value = _lookup(obj, path)
        if value is None:
            continue  # the API server only runs a rule where its value exists
        activation = {"self": celpy.json_to_cel(value)}
        ok = env.program(env.compile(rule["rule"])).evaluate(activation)
        if not bool(ok):
            if "messageExpression" in rule:
                msg = str(env.program(env.compile(rule["messageExpression"])).evaluate(activation))
            else:
                msg = str(rule.get("message") or rule["rule"])
            failures.append(msg)
    return failures


def admit(obj: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Default `obj` like the API server, then return it with every schema and CEL error."""
    defaulted = crd.apply_defaults(crd.openapi_schema(), dict(obj))
    errors = schema_errors(defaulted)
    if errors:
        return defaulted, errors  # CEL runs only on schema-valid objects
    return defaulted, cel_failures(defaulted)
