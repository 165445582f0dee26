"""The session service as token issuer: its signing keys, JWKS and discovery over HTTP.

``GET /.well-known/jwks.json`` publishes every key of the ring (services and Envoy
verify access tokens with them); ``GET /.well-known/openid-configuration`` names
the issuer and the key set. The OAuth endpoints (authorize, token, revoke) join
these with the identity issue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from mesh.settings import EnvReader
from mesh.tokens import ALGORITHM, KeyRing

log = logging.getLogger("opsmesh.identity")


@dataclass(frozen=True, kw_only=True)
class IssuerSettings:
    keys_dir: Path = Path(".run/keys")
    http_host: str = "127.0.0.1"
    http_port: int = 8090
    """0 turns the HTTP endpoints off."""
    access_token_ttl: float = 900.0

    @classmethod
    def from_env(cls, env: EnvReader) -> IssuerSettings:
        return cls(
            keys_dir=Path(env.string("OPSMESH_JWT_KEYS_DIR", ".run/keys")),
            http_host=env.string("OPSMESH_HOST", "127.0.0.1"),
            http_port=env.integer("OPSMESH_SESSION_HTTP_PORT", 8090, minimum=0, maximum=65535),
            access_token_ttl=env.seconds(
                "OPSMESH_ACCESS_TOKEN_TTL", 900, minimum=60, maximum=86400
            ),
        )


class IdentityHttp:
    def __init__(self, settings: IssuerSettings, ring: KeyRing, issuer: str) -> None:
        self._settings = settings
        self._ring = ring
        self._issuer = issuer
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0

    async def _jwks(self, request: web.Request) -> web.Response:
        self._ring.reload()  # keys rotated by the operator command appear without a restart
        return web.json_response(
            self._ring.jwks(), headers={"Cache-Control": "public, max-age=300"}
        )

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self._issuer,
                "jwks_uri": f"{self._issuer}/.well-known/jwks.json",
                "id_token_signing_alg_values_supported": [ALGORITHM],
                "token_endpoint_auth_methods_supported": ["none"],
            }
        )

    async def start(self) -> None:
        if self._settings.http_port == 0:
            return
        await self._runner.setup()
        await web.TCPSite(self._runner, self._settings.http_host, self._settings.http_port).start()
        self.port = int(self._runner.addresses[0][1])
        log.info("identity endpoints on %s:%d", self._settings.http_host, self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()
