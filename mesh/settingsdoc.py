"""``--help`` for the services: what the process is and the ``OPSMESH_*`` settings it reads.

The list comes from the service's settings class, where every setting is declared once as a
field (:mod:`mesh.settings`), with the defaults the service gives the shared ones (its own
gRPC port). Nothing is read from the environment and nothing connects: ``--help`` needs no
configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from mesh.settings import declared_settings


def help_text(settings: type[Any]) -> str:
    """One line per setting: its variable, its default here, and what an empty one means."""
    lines = ["settings (environment variables; an empty value means the default):"]
    for declared in sorted(declared_settings(settings), key=lambda d: d.spec.variable):
        default = f"  default {declared.default}" if declared.default else ""
        required = "  required" if declared.required else ""
        doc = f"  ({declared.spec.doc})" if declared.spec.doc else ""
        lines.append(f"  {declared.spec.variable}{default}{required}{doc}")
    return "\n".join(lines)


def parse_command_line(module: str, settings: type[Any], argv: Sequence[str] | None = None) -> None:
    """Services take no arguments: ``--help`` prints the settings and exits 0, others exit 2.

    ``module`` is the ``__name__`` of the service's entry module (``__main__`` under ``-m``);
    ``settings`` its settings class.
    """
    loaded = sys.modules.get(module)
    spec = getattr(loaded, "__spec__", None)
    name = spec.name if module == "__main__" and spec is not None else module
    parser = argparse.ArgumentParser(
        prog=f"python -m {name.removesuffix('.server')}",
        description=(getattr(loaded, "__doc__", None) or "").strip(),
        epilog=help_text(settings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
