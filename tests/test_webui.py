"""The web client's file server: caching, client routes, traversal, and its security headers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mesh.settings import SettingsError, load
from webui.server import IMMUTABLE, WebClientFiles, WebSettings


@pytest.fixture
def build(tmp_path: Path) -> Path:
    root = tmp_path / "dist"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><div id=root></div>")
    (root / "assets" / "index-abc123.js").write_text("console.log('app')" * 100)
    (root / "favicon.svg").write_text("<svg/>")
    (tmp_path / "secret.txt").write_text("outside the build")
    return root


@pytest.fixture
async def client(build: Path) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    files = WebClientFiles(WebSettings(root=build, connect_src=("https://api.example",)))
    async with TestClient(TestServer(files.app())) as test_client:
        yield test_client


async def test_client_routes_get_index_html_uncached_with_a_strict_policy(client) -> None:
    for path in ("/", "/tasks", "/oauth/callback?code=x&state=y", "/email/deep/link"):
        response = await client.get(path)
        assert response.status == 200, path
        assert "<div id=root>" in await response.text()
        assert response.headers["Cache-Control"] == "no-cache"
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "connect-src 'self' https://api.example" in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["Referrer-Policy"] == "no-referrer"  # the code stays in the tab
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_hashed_assets_are_immutable_and_missing_ones_are_404_not_html(client) -> None:
    asset = await client.get("/assets/index-abc123.js", headers={"Accept-Encoding": "gzip"})
    assert asset.status == 200
    assert asset.headers["Cache-Control"] == IMMUTABLE
    assert asset.headers["Content-Encoding"] == "gzip"
    missing = await client.get("/assets/index-old.js")
    assert missing.status == 404
    icon = await client.get("/favicon.svg")
    assert icon.status == 200
    assert "max-age=3600" in icon.headers["Cache-Control"]


async def test_paths_cannot_leave_the_build_folder(client) -> None:
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/assets/..%2f..%2fsecret.txt"):
        response = await client.get(path)
        assert "outside the build" not in await response.text(), path


async def test_only_reads_are_answered(client) -> None:
    assert (await client.post("/", data=b"x")).status == 405


async def test_health_says_whether_a_build_is_there(client, build: Path) -> None:
    assert (await client.get("/healthz")).status == 200
    (build / "index.html").unlink()
    assert (await client.get("/healthz")).status == 503
    missing = await client.get("/tasks")
    assert missing.status == 503
    assert "not built" in await missing.text()


def test_settings_from_the_environment_and_their_errors(tmp_path: Path) -> None:
    settings = load(WebSettings, {"OPSMESH_WEB_ROOT": str(tmp_path), "OPSMESH_WEB_PORT": "9999"})
    assert settings.root == tmp_path
    assert settings.port == 9999
    with pytest.raises(SettingsError, match="OPSMESH_WEB_PORT"):
        load(WebSettings, {"OPSMESH_WEB_PORT": "http"})
    result = subprocess.run(
        [sys.executable, "-m", "webui"],
        env=dict(os.environ, OPSMESH_WEB_PORT="-1"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "OPSMESH_WEB_PORT" in result.stderr
