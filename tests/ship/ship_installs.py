"""The chart installed by real Helm into the emulator, once per values set and shared by the test
modules of tests/ship (each install takes about a second)."""

from __future__ import annotations

import functools

from ship_support import Install, example_values, helm_install

# Namespaces an example's watchNamespaces names must exist before Helm puts Roles into them.
EXAMPLE_NAMESPACES = {"namespaced": ("team-a", "team-b")}


@functools.cache
def installed(name: str) -> Install:
    """ "default" (values.yaml as is) or the stem of a file in charts/inferfleet/examples/."""
    if name == "default":
        return helm_install()
    return helm_install(example_values()[name], namespaces=EXAMPLE_NAMESPACES.get(name, ()))


def install_names() -> list[str]:
    return ["default", *example_values()]
