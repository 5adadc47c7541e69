"""Real Helm for tests/ship: helm-sdkpy (Helm 4's Go library through cffi), run under .venv312.

helm-sdkpy needs Python 3.12, the test suite runs on the project's .venv, so the tests start this
script as a subprocess with the .venv312 interpreter (`make venv312` creates it) and read one JSON
document from its stdout:

    python helm_driver.py version
    python helm_driver.py lint CHART_DIR
    python helm_driver.py install KUBECONFIG NAMESPACE RELEASE CHART_DIR [VALUES_JSON]

`install` never waits for readiness (there is no kubelet behind the emulator it installs into).
The caller sets HELM_DRIVER=memory: Helm's default release storage (Secrets) talks protobuf,
which the emulator does not parse; the memory driver keeps the release record in this process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import helm_sdkpy


def _print(doc: Any) -> None:
    json.dump(doc, sys.stdout)
    sys.stdout.write("\n")


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "version":
        _print({"helm_sdkpy": helm_sdkpy.__version__, "library": helm_sdkpy.get_version()})
        return 0
    if command == "lint":
        (chart,) = args
        config = helm_sdkpy.Configuration(namespace="default")
        _print(asyncio.run(helm_sdkpy.Lint(config).run(chart)))
        return 0
    if command == "install":
        kubeconfig, namespace, release, chart, *rest = args
        values = json.loads(rest[0]) if rest else None
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
        try:
            result = asyncio.run(
                helm_sdkpy.Install(config).run(release, chart, values=values, wait=False, timeout=60)
            )
        except helm_sdkpy.HelmError as e:
            _print({"error": str(e)})
            return 1
        _print(result)
        return 0
    print(f"unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
