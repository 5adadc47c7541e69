"""inferfleet-operator: `run` (the kopf operator), `render` (children as YAML), `crd`.

inferfleet-operator run -A                        # all namespaces, liveness on :8080
inferfleet-operator run -n team-a -n team-b
inferfleet-operator render -f isvc.yaml           # what the operator would create
inferfleet-operator crd                           # the CustomResourceDefinition
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import yaml
from inferfleet.operator import crd
from inferfleet.operator.plan import plan
from inferfleet.operator.spec import SpecError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferfleet-operator", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator (kopf)")
    scope = run.add_mutually_exclusive_group(required=True)
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace")
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="serve this namespace (repeatable)"
    )
    run.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint URL; empty to disable (default: %(default)s)",
    )
    run.add_argument(
        "--peering",
        default=None,
        metavar="NAME",
        help="join kopf peering NAME (default: standalone; run one replica with strategy Recreate)",
    )
    run.add_argument("--status-interval", type=float, default=30.0, help="seconds between status refreshes")
    run.add_argument("--resync-interval", type=float, default=120.0, help="seconds between drift checks")
    run.add_argument("-v", "--verbose", action="store_true")
    run.add_argument("--debug", action="store_true")

    render = sub.add_parser("render", help="print every object an InferenceService would own, as YAML")
    render.add_argument("-f", "--filename", action="append", required=True, help="YAML file, or - for stdin")
    render.add_argument("-n", "--namespace", default=None, help="override metadata.namespace")

    sub.add_parser("crd", help="print the InferenceService CustomResourceDefinition")
    return p


def _documents(paths: Sequence[str], stdin: TextIO) -> Iterator[dict[str, Any]]:
    for path in paths:
        if path == "-":
            docs = list(yaml.safe_load_all(stdin))
        else:
            with open(path, encoding="utf-8") as f:
                docs = list(yaml.safe_load_all(f))
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") == crd.KIND:
                yield doc


def render(paths: Sequence[str], namespace: str | None, out: TextIO, stdin: TextIO) -> int:
    objects: list[dict[str, Any]] = []
    for doc in _documents(paths, stdin):
        if namespace:
            doc.setdefault("metadata", {})["namespace"] = namespace
        objects.extend(plan(doc))
    if not objects:
        print(f"no {crd.KIND} found in {', '.join(paths)}", file=sys.stderr)
        return 1
    out.write(yaml.safe_dump_all(objects, sort_keys=False, width=1000))
    return 0


def _run(args: argparse.Namespace) -> int:
    import kopf  # the render path must not need a cluster library at all
    from inferfleet.operator.config import OperatorConfig
    from inferfleet.operator.handlers import build_registry

    kopf.configure(debug=args.debug, verbose=args.verbose)
    config = OperatorConfig(status_interval_s=args.status_interval, resync_interval_s=args.resync_interval)
    kopf.run(
        registry=build_registry(config),
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness or None,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "render":
        try:
            return render(args.filename, args.namespace, sys.stdout, sys.stdin)
        except SpecError as e:
            print(f"invalid {crd.KIND}: {e}", file=sys.stderr)
            return 2
    if args.command == "crd":
        sys.stdout.write(crd.render_crd_yaml())
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
