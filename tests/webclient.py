"""The web client's build for tests that serve it (the dev stack, the browser tests)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI = ROOT / "ui"
DIST = UI / "dist"
SOURCES = (UI / "src", UI / "public", UI / "index.html", UI / "vite.config.ts", ROOT / "gen" / "ts")


def _newest_source() -> float:
    newest = 0.0
    for source in SOURCES:
        files = source.rglob("*") if source.is_dir() else [source]
        newest = max([newest, *(f.stat().st_mtime for f in files if f.is_file())])
    return newest


def ensure_built() -> Path:
    """ui/dist, (re)built when missing or older than its sources (``make test`` builds it first,
    so this only works for a bare ``pytest``)."""
    index = DIST / "index.html"
    if index.is_file() and index.stat().st_mtime >= _newest_source():
        return DIST
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is missing: on Debian, apt-get install npm")
    if not (ROOT / "node_modules" / ".bin" / "vite").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=ROOT, check=True, timeout=600)
    subprocess.run([npm, "--workspace", "ui", "run", "build"], cwd=ROOT, check=True, timeout=600)
    return DIST
