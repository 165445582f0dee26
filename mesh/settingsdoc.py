"""``--help`` for the services: what the process is and the ``OPSMESH_*`` settings it reads.

The list is read from the installed sources (the package's modules and the ``mesh`` modules
they import), so it cannot drift from the code: every setting goes through
:class:`mesh.settings.EnvReader` as ``env.<type>("OPSMESH_X", default, ...)``. Nothing is
imported, so ``--help`` connects to nothing and needs no configuration.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_SETTING = re.compile(r"OPSMESH_[A-Z0-9_]+")


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    """The default's literal from the source; empty when it is computed."""


def _source_files(module: str) -> list[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return []
    origin = Path(spec.origin)
    if spec.submodule_search_locations is None:
        return [origin]
    return sorted(origin.parent.rglob("*.py"))


def _mesh_imports(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mesh."):
            yield str(node.module)


def _settings_in(tree: ast.Module) -> Iterator[Setting]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        first = node.args[0]
        if isinstance(first, ast.Constant) and _SETTING.fullmatch(str(first.value)):
            yield Setting(name=str(first.value), default=_literal(node.args[1:]))


def _literal(arguments: Sequence[ast.expr]) -> str:
    """The default when the source spells it out; computed ones are the docs' to explain."""
    if not arguments:
        return ""
    try:
        return repr(ast.literal_eval(arguments[0]))
    except ValueError:
        return ""


def settings_read_by(module: str, *, follow_mesh: bool = True) -> list[Setting]:
    """The settings ``module``'s package reads, with the shared ones of the mesh modules it uses."""
    package = module.split(".")[0]
    pending = [package]
    seen: set[str] = set()
    found: dict[str, Setting] = {}
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for path in _source_files(name):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for setting in _settings_in(tree):
                found.setdefault(setting.name, setting)
            if follow_mesh:
                pending.extend(_mesh_imports(tree))
    return sorted(found.values(), key=lambda setting: setting.name)


def help_text(module: str, *, follow_mesh: bool = True) -> str:
    lines = ["settings (environment variables; an empty value means the default):"]
    for setting in settings_read_by(module, follow_mesh=follow_mesh):
        default = f"  default {setting.default}" if setting.default else ""
        lines.append(f"  {setting.name}{default}")
    return "\n".join(lines)


def parse_command_line(
    module: str, argv: Sequence[str] | None = None, *, follow_mesh: bool = True
) -> None:
    """Services take no arguments: ``--help`` prints the settings and exits 0, others exit 2.

    ``module`` is the ``__name__`` of the service's entry module (``__main__`` under ``-m``).
    """
    loaded = sys.modules.get(module)
    spec = getattr(loaded, "__spec__", None)
    name = spec.name if module == "__main__" and spec is not None else module
    parser = argparse.ArgumentParser(
        prog=f"python -m {name.removesuffix('.server')}",
        description=(getattr(loaded, "__doc__", None) or "").strip(),
        epilog=help_text(name, follow_mesh=follow_mesh),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
