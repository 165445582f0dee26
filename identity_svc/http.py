"""The identity service's HTTP side: the OAuth 2.1 authorization server.

* ``GET /.well-known/openid-configuration``: discovery; ``GET /.well-known/jwks.json``:
  every key of the ring (services and Envoy verify access tokens with them).
* ``GET/POST /oauth/authorize``: the login page for local accounts (authorization code
  with PKCE S256 only, exact redirect URIs, supported scopes only). The POST must not
  name another origin (``Origin: null``, what browsers send under no-referrer, names
  none) and must carry the page's form token, which is bound to the authorization
  request and to a SameSite cookie (login CSRF). Failed logins are
  throttled per client address, which is taken from X-Forwarded-For only as far as the
  hops are trusted proxies (docs/identity.md).
* ``POST /oauth/token``: ``authorization_code`` (with ``code_verifier``),
  ``refresh_token`` (rotating) and ``client_credentials``; ``POST /oauth/revoke``: ends
  a refresh token's session.
* The account pages (identity_svc/web.py: one stylesheet, no-referrer, form tokens):
  ``/account/password/*`` (reset, identity_svc/reset_pages.py) and ``/invitations/accept``
  (identity_svc/invitation_pages.py), added with :meth:`IdentityHttp.add_pages`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_plus, urlencode

from aiohttp import web

from identity_svc.accounts import Accounts, SignInThrottled
from identity_svc.keys import KeyRing
from identity_svc.oauth import SUPPORTED_SCOPES, OAuthError, OAuthServer, granted_scope
from identity_svc.web import (
    FORM_TOKEN_FIELD,
    STYLESHEET_PATH,
    Pages,
    foreign_origin,
    form_token,
    origin_of,
    page,
    stylesheet,
)
from mesh.errors import ResourceExhausted
from mesh.settings import fixed, port_number, required, seconds, setting
from mesh.tokens import ALGORITHM

log = logging.getLogger("opsmesh.identity")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(raw: str) -> tuple[Network, ...]:
    """Comma-separated addresses or CIDRs (``127.0.0.1/32, ::1``)."""
    networks = []
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is no IP address or CIDR") from None
    return tuple(networks)


@dataclass(frozen=True, kw_only=True)
class IssuerSettings:
    keys_dir: Path = required(
        "OPSMESH_JWT_KEYS_DIR",
        Path,
        doc="the directory of the token signing keys",
    )
    """The token signing keys: required, because a default path would make a second key
    ring wherever the service happened to start."""
    http_host: str = fixed("127.0.0.1", why="the service's OPSMESH_HOST, given by identity_svc")
    http_port: int = port_number("OPSMESH_IDENTITY_HTTP_PORT", 8090, doc="0: no OAuth endpoints")
    """0 turns the HTTP endpoints off."""
    access_token_ttl: float = seconds("OPSMESH_ACCESS_TOKEN_TTL", 900.0, minimum=60, maximum=86400)
    trusted_proxies: tuple[Network, ...] = setting(
        "OPSMESH_TRUSTED_PROXIES", (), parse_networks, doc="addresses or CIDRs, comma-separated"
    )
    """Peers whose X-Forwarded-For is believed (the edge); none: the peer is the client."""


def client_address(peer: str, forwarded_for: list[str], trusted: tuple[Network, ...]) -> str:
    """The client's address: walking X-Forwarded-For from the right (the hop nearest to us),
    past every trusted proxy, the first address that is not one. Anything further left was
    written by the client itself and is never believed."""
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    address = peer
    for hop in reversed([h for h in hops if h]):
        if not _is_trusted(address, trusted):
            break
        try:
            address = str(ipaddress.ip_address(hop))
        except ValueError:
            break  # garbage from beyond the trusted hops: the last trusted hop is the client
    return address


def _is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in trusted)


def basic_credentials(header: str) -> tuple[str, str] | None:
    """``Authorization: Basic`` client credentials (RFC 6749 §2.3.1: each part form-encoded),
    None without the Basic scheme, OAuthError ``invalid_client`` if malformed."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _bad_client("malformed Basic credentials") from None
    client_id, colon, secret = decoded.partition(":")
    if not colon or not client_id:
        raise _bad_client("Basic credentials need client_id:client_secret")
    try:
        return unquote_plus(client_id, errors="strict"), unquote_plus(secret, errors="strict")
    except UnicodeDecodeError:
        raise _bad_client("Basic credentials percent-encode no UTF-8") from None


def _bad_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, 401)


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
LOGIN_COOKIE = "opsmesh_login"
# Every identity response: no MIME sniffing, no URL (with codes, state or a reset or
# invitation token) in any Referer header, not even to our own origin.
_BASELINE_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def sign_in_token(browser_secret: str, params: Mapping[str, str]) -> str:
    """The sign-in form's token: the authorization request, keyed with the browser's cookie."""
    return form_token(
        browser_secret, "sign-in", *(f"{name}={params.get(name, '')}" for name in _AUTHORIZE_FIELDS)
    )


def _oauth_error(error: OAuthError) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    if error.error == "invalid_client":
        headers["WWW-Authenticate"] = 'Basic realm="opsmesh"'
    return web.json_response(
        {"error": error.error, "error_description": error.description},
        status=error.status,
        headers=headers,
    )


@web.middleware
async def _baseline_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as redirect:
        redirect.headers.update(_BASELINE_HEADERS)
        raise
    response.headers.update(_BASELINE_HEADERS)
    return response


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
        self._pages: list[Pages] = []
        app = web.Application(client_max_size=64 * 1024, middlewares=[_baseline_headers])
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        if oauth is not None and accounts is not None:
            app.router.add_get("/oauth/authorize", self._authorize_page)
            app.router.add_post("/oauth/authorize", self._authorize)
            app.router.add_post("/oauth/token", self._token)
            app.router.add_post("/oauth/revoke", self._revoke)
            app.router.add_get(STYLESHEET_PATH, stylesheet)
        self._app = app
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0

    def add_pages(self, pages: Pages) -> None:
        """Serves ``pages`` too (before :meth:`start`)."""
        pages.add_routes(self._app)
        self._pages.append(pages)

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
                scopes_supported=list(SUPPORTED_SCOPES),
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
        granted_scope(params["scope"])
        return params

    def address_of(self, request: web.Request) -> str:
        return client_address(
            request.remote or "unknown",
            request.headers.getall("X-Forwarded-For", []),
            self._settings.trusted_proxies,
        )

    async def _authorize_page(self, request: web.Request) -> web.Response:
        try:
            params = self._checked_request(request.query)
        except OAuthError as error:
            return _oauth_error(error)
        secret = request.cookies.get(LOGIN_COOKIE, "")
        if len(secret) < 32:
            secret = secrets.token_urlsafe(32)
        response = self._login(params, secret, "", "", 200)
        response.set_cookie(
            LOGIN_COOKIE,
            secret,
            path="/oauth/authorize",
            httponly=True,
            samesite="Strict",
            secure=self._issuer.startswith("https:"),
        )
        return response

    def _login(
        self, params: dict[str, str], secret: str, error: str, username: str, status: int
    ) -> web.Response:
        hidden = {**params, FORM_TOKEN_FIELD: sign_in_token(secret, params)}
        return page(
            "sign_in.html",
            status=status,
            # The form posts here and its answer redirects to the client: both allowed.
            form_targets=origin_of(params["redirect_uri"]),
            title="Sign in to opsmesh",
            hidden=hidden,
            error=error,
            username=username,
        )

    def _forged(self, request: web.Request, params: dict[str, str], token: str) -> bool:
        """Did the POST not come from our own login page in this browser?"""
        if foreign_origin(request, self._issuer):
            return True
        secret = request.cookies.get(LOGIN_COOKIE, "")
        return not secret or not hmac.compare_digest(token, sign_in_token(secret, params))

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        assert self._oauth is not None
        assert self._accounts is not None
        form = {k: str(v) for k, v in (await request.post()).items()}
        try:
            params = self._checked_request(form)
        except OAuthError as error:
            return _oauth_error(error)
        if self._forged(request, params, form.get(FORM_TOKEN_FIELD, "")):
            raise web.HTTPForbidden(
                text="This sign-in form did not come from this server; start the sign-in again.",
                headers={"Cache-Control": "no-store"},
            )
        secret = request.cookies[LOGIN_COOKIE]
        username = form.get("username", "")[:128]
        try:
            account = await self._accounts.verify(
                username, form.get("password", ""), self.address_of(request)
            )
        except ResourceExhausted as refused:
            message = (
                "Too many failed sign-ins; try again later."
                if isinstance(refused, SignInThrottled)
                else "The server is busy; try again in a moment."
            )
            response = self._login(params, secret, message, username, 429)
            response.headers["Retry-After"] = str(int(refused.retry_after or 1) + 1)
            return response
        if account is None:
            return self._login(params, secret, "Wrong user or password.", username, 401)
        if not account.org_id:  # removed from every organization: nothing to sign in to
            message = "This account belongs to no organization any more."
            return self._login(params, secret, message, username, 403)
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
            body = await self._grant(form, request.headers.get("Authorization", ""))
        except OAuthError as error:
            return _oauth_error(error)
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def _grant(self, form: Mapping[str, str], authorization: str) -> dict[str, object]:
        assert self._oauth is not None
        basic = basic_credentials(authorization)
        grant = form.get("grant_type", "")
        if grant == "authorization_code":
            return await self._oauth.exchange_code(
                code=form.get("code", ""),
                client_id=form.get("client_id", ""),
                redirect_uri=form.get("redirect_uri", ""),
                verifier=form.get("code_verifier", ""),
            )
        if grant == "client_credentials":
            client_id, secret = basic or (form.get("client_id", ""), form.get("client_secret", ""))
            return self._oauth.client_credentials(client_id=client_id, secret=secret)
        if grant == "refresh_token":
            return await self._oauth.refresh(
                refresh_token=form.get("refresh_token", ""),
                client_id=form.get("client_id", ""),
                # Switching organization: tokens for another org of the same user.
                org_id=form.get("org_id", ""),
            )
        raise OAuthError("unsupported_grant_type", f"grant_type {grant[:40]!r} is not supported")

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
        for more in self._pages:
            await more.drain()
        if self._accounts is not None:
            self._accounts.close()
