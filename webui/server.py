"""The web client's static files.

``/assets/*`` carry a content hash in their names and are cached for a year; any other GET is
a file of the build's top level (favicon) or a client route, answered with ``index.html``,
which is never cached so a deploy takes effect on the next load. Every answer carries a strict
Content-Security-Policy: the client keeps its tokens in the page, so no script but its own may
run, and ``Referrer-Policy: no-referrer`` keeps the OAuth callback's code out of Referer headers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from mesh.logs import configure_logging
from mesh.settings import (
    SettingsError,
    host_setting,
    load,
    log_format_setting,
    log_level_setting,
    port_number,
    required,
    words,
)
from mesh.settingsdoc import parse_command_line

log = logging.getLogger("opsmesh.webui")

IMMUTABLE = "public, max-age=31536000, immutable"


def _web_root(raw: str) -> Path:
    root = Path(raw)
    if not root.is_dir():
        raise ValueError("no such directory")
    return root


@dataclass(frozen=True, kw_only=True)
class WebSettings:
    root: Path = required(
        "OPSMESH_WEB_ROOT",
        _web_root,
        doc="the folder of a web client build ('npm --workspace ui run build' writes ui/dist)",
    )
    """The web client build (index.html, assets/); required: the wheel carries no UI."""
    host: str = host_setting()
    port: int = port_number("OPSMESH_WEB_PORT", 8095)
    connect_src: tuple[str, ...] = words(
        "OPSMESH_WEB_CONNECT_SRC", doc="origins besides the page's own the client may call"
    )
    """Origins besides the page's own the client may call (an API on another origin)."""
    log_level: str = log_level_setting()
    log_format: str = log_format_setting()


def security_headers(connect_src: tuple[str, ...]) -> dict[str, str]:
    policy = "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            # React sets style properties; email previews carry inline styles in a sandbox.
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",
            "connect-src " + " ".join(("'self'", *connect_src)),
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "object-src 'none'",
        )
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


class WebClientFiles:
    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.root = settings.root.resolve()
        self._headers = security_headers(settings.connect_src)
        self.port = settings.port

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/{path:.*}", self._file)
        app.on_response_prepare.append(self._secure)
        return app

    async def _secure(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(self._headers)

    async def _health(self, request: web.Request) -> web.Response:
        if (self.root / "index.html").is_file():
            return web.Response(text="ok", headers={"Cache-Control": "no-store"})
        return web.Response(text=f"no build in {self.root}", status=503)

    def _inside(self, relative: str) -> Path | None:
        candidate = (self.root / relative).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            return None  # ../ tricks stay out of the build folder
        return candidate if candidate.is_file() else None

    async def _file(self, request: web.Request) -> web.StreamResponse:
        relative = request.match_info["path"]
        found = self._inside(relative) if relative else None
        if relative.startswith("assets/"):
            if found is None:
                raise web.HTTPNotFound(text="no such asset")  # never index.html for a script
            response = web.FileResponse(found, headers={"Cache-Control": IMMUTABLE})
            response.enable_compression()
            return response
        if found is not None and found.name != "index.html":
            return web.FileResponse(found, headers={"Cache-Control": "public, max-age=3600"})
        index = self._inside("index.html")
        if index is None:
            raise web.HTTPServiceUnavailable(
                text="the web client is not built: run 'npm --workspace ui run build'"
            )
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})


async def serve(settings: WebSettings) -> None:
    files = WebClientFiles(settings)
    runner = web.AppRunner(files.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    log.info("serving the web client from %s on %s:%d", files.root, settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()


def main() -> None:
    parse_command_line(__name__, WebSettings)
    try:
        settings = load(WebSettings, os.environ)
    except SettingsError as error:
        print(f"webui: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    configure_logging(service="webui", level=settings.log_level, fmt=settings.log_format)
    asyncio.run(serve(settings))
