"""The session service as OAuth 2.1 authorization server, over HTTP.

* ``GET /.well-known/openid-configuration``: discovery; ``GET /.well-known/jwks.json``:
  every key of the ring (services and Envoy verify access tokens with them).
* ``GET/POST /oauth/authorize``: the login page for local accounts (authorization code
  with PKCE S256 only, exact redirect URIs); failed logins are rate limited.
* ``POST /oauth/token``: ``authorization_code`` (with ``code_verifier``) and
  ``refresh_token`` (rotating); ``POST /oauth/revoke``: ends a refresh token's session.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from mesh.settings import EnvReader
from mesh.tokens import ALGORITHM, KeyRing
from session_svc.accounts import Accounts
from session_svc.oauth import OAuthError, OAuthServer

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


_LOGIN = jinja2.Environment(autoescape=True).from_string(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Sign in to opsmesh</title></head>
<body style="font-family:system-ui,sans-serif;max-width:360px;margin:64px auto">
<h1>Sign in to opsmesh</h1>
{% if error %}<p role="alert" style="color:#b91c1c">{{ error }}</p>{% endif %}
<form method="post" action="/oauth/authorize">
{% for name, value in hidden.items() %}<input type="hidden" name="{{ name }}" value="{{ value }}">
{% endfor %}<p><label for="username">User</label><br>
<input id="username" name="username" autocomplete="username" required value="{{ username }}"></p>
<p><label for="password">Password</label><br>
<input id="password" name="password" type="password" autocomplete="current-password" required></p>
<p><button type="submit">Sign in</button></p></form></body></html>"""
)
_AUTHORIZE_FIELDS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "scope",
    "code_challenge",
    "code_challenge_method",
    "nonce",
)


def _oauth_error(error: OAuthError) -> web.Response:
    return web.json_response(
        {"error": error.error, "error_description": error.description},
        status=error.status,
        headers={"Cache-Control": "no-store"},
    )


class IdentityHttp:
    def __init__(
        self,
        settings: IssuerSettings,
        ring: KeyRing,
        issuer: str,
        *,
        oauth: OAuthServer | None = None,
        accounts: Accounts | None = None,
    ) -> None:
        self._settings = settings
        self._ring = ring
        self._issuer = issuer
        self._oauth = oauth
        self._accounts = accounts
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        if oauth is not None and accounts is not None:
            app.router.add_get("/oauth/authorize", self._authorize_page)
            app.router.add_post("/oauth/authorize", self._authorize)
            app.router.add_post("/oauth/token", self._token)
            app.router.add_post("/oauth/revoke", self._revoke)
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0

    async def _jwks(self, request: web.Request) -> web.Response:
        self._ring.reload()  # keys rotated by the operator command appear without a restart
        return web.json_response(
            self._ring.jwks(), headers={"Cache-Control": "public, max-age=300"}
        )

    async def _discovery(self, request: web.Request) -> web.Response:
        document: dict[str, object] = {
            "issuer": self._issuer,
            "jwks_uri": f"{self._issuer}/.well-known/jwks.json",
            "id_token_signing_alg_values_supported": [ALGORITHM],
        }
        if self._oauth is not None:
            document.update(
                authorization_endpoint=f"{self._issuer}/oauth/authorize",
                token_endpoint=f"{self._issuer}/oauth/token",
                revocation_endpoint=f"{self._issuer}/oauth/revoke",
                response_types_supported=["code"],
                scopes_supported=["openid", "offline_access"],
                subject_types_supported=["public"],
                claims_supported=["sub", "preferred_username", "org_id", "roles", "sid", "nonce"],
                grant_types_supported=["authorization_code", "refresh_token", "client_credentials"],
                code_challenge_methods_supported=["S256"],
                token_endpoint_auth_methods_supported=[
                    "none",
                    "client_secret_basic",
                    "client_secret_post",
                ],
            )
        return web.json_response(document)

    def _checked_request(self, fields: Mapping[str, str]) -> dict[str, str]:
        """The authorize parameters, or OAuthError for anything a public client may not ask."""
        assert self._oauth is not None
        params = {name: str(fields.get(name, "")) for name in _AUTHORIZE_FIELDS}
        self._oauth.check_client(params["client_id"], params["redirect_uri"])
        if params["response_type"] != "code":
            raise OAuthError("unsupported_response_type", "only response_type=code is supported")
        if params["code_challenge_method"] != "S256":
            raise OAuthError("invalid_request", "PKCE with code_challenge_method=S256 is required")
        if not 43 <= len(params["code_challenge"]) <= 128:
            raise OAuthError("invalid_request", "code_challenge must be 43-128 characters")
        return params

    async def _authorize_page(self, request: web.Request) -> web.Response:
        try:
            params = self._checked_request(request.query)
        except OAuthError as error:
            return _oauth_error(error)
        return self._login(params, "", "", 200)

    def _login(
        self, params: dict[str, str], error: str, username: str, status: int
    ) -> web.Response:
        return web.Response(
            text=_LOGIN.render(hidden=params, error=error, username=username),
            content_type="text/html",
            status=status,
            headers={
                "Cache-Control": "no-store",
                "X-Frame-Options": "DENY",
                "Content-Security-Policy": (
                    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
                ),
            },
        )

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        assert self._oauth is not None
        assert self._accounts is not None
        form = await request.post()
        try:
            params = self._checked_request({k: str(v) for k, v in form.items()})
        except OAuthError as error:
            return _oauth_error(error)
        username = str(form.get("username", ""))[:128]
        address = request.remote or "unknown"
        wait = await self._accounts.locked(username, address)
        if wait:
            response = self._login(
                params, "Too many failed sign-ins; try again later.", username, 429
            )
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        account = await self._accounts.verify(username, str(form.get("password", "")), address)
        if account is None:
            return self._login(params, "Wrong user or password.", username, 401)
        code = await self._oauth.issue_code(
            account,
            client_id=params["client_id"],
            redirect_uri=params["redirect_uri"],
            challenge=params["code_challenge"],
            scope=params["scope"],
            nonce=params["nonce"][:256],
        )
        query = {"code": code, "iss": self._issuer}
        if params["state"]:
            query["state"] = params["state"]
        raise web.HTTPFound(f"{params['redirect_uri']}?{urlencode(query)}")

    async def _token(self, request: web.Request) -> web.Response:
        assert self._oauth is not None
        form = {k: str(v) for k, v in (await request.post()).items()}
        try:
            grant = form.get("grant_type", "")
            if grant == "authorization_code":
                body = await self._oauth.exchange_code(
                    code=form.get("code", ""),
                    client_id=form.get("client_id", ""),
                    redirect_uri=form.get("redirect_uri", ""),
                    verifier=form.get("code_verifier", ""),
                )
            elif grant == "client_credentials":
                client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
                basic = request.headers.get("Authorization", "")
                if basic.lower().startswith("basic "):
                    decoded = base64.b64decode(basic[6:].strip() + "==").decode(errors="replace")
                    client_id, _, secret = decoded.partition(":")
                body = self._oauth.client_credentials(client_id=client_id, secret=secret)
            elif grant == "refresh_token":
                body = await self._oauth.refresh(
                    refresh_token=form.get("refresh_token", ""), client_id=form.get("client_id", "")
                )
            else:
                raise OAuthError(
                    "unsupported_grant_type", f"grant_type {grant[:40]!r} is not supported"
                )
        except OAuthError as error:
            return _oauth_error(error)
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def _revoke(self, request: web.Request) -> web.Response:
        assert self._oauth is not None
        form = await request.post()
        await self._oauth.revoke(str(form.get("token", "")))
        return web.Response(status=200)

    async def start(self) -> None:
        if self._settings.http_port == 0:
            return
        await self._runner.setup()
        await web.TCPSite(self._runner, self._settings.http_host, self._settings.http_port).start()
        self.port = int(self._runner.addresses[0][1])
        log.info("identity endpoints on %s:%d", self._settings.http_host, self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()
