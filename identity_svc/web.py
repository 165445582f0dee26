"""What every identity page shares: the templates (identity_svc/pages/), the stylesheet,
the security headers, and the protection of their forms.

Headers: every page forbids framing, caching and any resource but our own stylesheet
(``Content-Security-Policy``), and sends ``Referrer-Policy: no-referrer``: the reset and
invitation pages carry a token in their URL, and no request they cause (the stylesheet,
a link followed) may repeat it in a ``Referer``.

Forms: a POST is accepted only with the form token its page rendered, an HMAC of the
page's purpose and bound values keyed with a random cookie (HttpOnly, SameSite=Strict),
so another site can neither read the token nor make the browser send the cookie. The
``Origin`` header is checked too, but ``Origin: null`` counts as "no origin": under
``no-referrer`` browsers send exactly that for our own forms (Fetch standard,
"serializing a request origin"), and a foreign page that sends it still lacks the cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any, Protocol
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from identity_svc.passwords import MIN_PASSWORD

FORM_TOKEN_FIELD = "form_token"  # noqa: S105 - a form field's name, no secret
FORM_COOKIE = "opsmesh_form"
STYLESHEET_PATH = "/account/style.css"
_PAGES = jinja2.Environment(
    loader=jinja2.PackageLoader("identity_svc", "pages"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_PAGE_DEFAULTS: dict[str, Any] = {"error": "", "hidden": {}, "min_password": MIN_PASSWORD}


class Pages(Protocol):
    """A set of pages the identity HTTP server serves (reset, invitations)."""

    def add_routes(self, app: web.Application) -> None: ...

    async def drain(self) -> None:
        """Finishes work started after an answer (emails on their way), at shutdown."""


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def page(
    template: str, *, status: int = 200, form_targets: str = "", **context: Any
) -> web.Response:
    """A rendered page with the headers every identity page sends. ``form_targets``: origins
    besides our own that a form on it may lead to (the sign-in form redirects to the client)."""
    body = _PAGES.get_template(template).render({**_PAGE_DEFAULTS, **context})
    form_action = f"'self' {form_targets}".strip()
    return web.Response(
        text=body,
        content_type="text/html",
        status=status,
        headers={
            "Cache-Control": "no-store",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": (
                "default-src 'none'; style-src 'self'; base-uri 'none'; "
                f"form-action {form_action}; frame-ancestors 'none'"
            ),
        },
    )


_STYLESHEET = _PAGES.loader.get_source(_PAGES, "style.css")[0]  # type: ignore[union-attr]


async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(
        text=_STYLESHEET,
        content_type="text/css",
        headers={"Cache-Control": "public, max-age=3600"},
    )


def foreign_origin(request: web.Request, issuer: str) -> bool:
    """Did the browser say the POST came from another origin than the issuer's?"""
    origin = request.headers.get("Origin")
    return origin is not None and origin != "null" and origin.lower() != origin_of(issuer)


def form_token(browser_secret: str, purpose: str, *bound: str) -> str:
    """A form's token: its purpose and bound values, keyed with the browser's cookie."""
    message = "\n".join((purpose, *bound))
    digest = hmac.new(browser_secret.encode(), message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


class FormGuard:
    """The cookie and token of the account pages' forms (not the sign-in form: its token is
    bound to the authorization request, identity_svc/http.py)."""

    def __init__(self, issuer: str) -> None:
        self._issuer = issuer

    def secret(self, request: web.Request) -> str:
        """The browser's form secret, or a new one (:meth:`remember` then sets the cookie)."""
        secret = request.cookies.get(FORM_COOKIE, "")
        return secret if len(secret) >= 32 else secrets.token_urlsafe(32)

    def remember(self, response: web.StreamResponse, secret: str) -> None:
        response.set_cookie(
            FORM_COOKIE,
            secret,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self._issuer.startswith("https:"),
        )

    def hidden(self, secret: str, purpose: str, **fields: str) -> dict[str, str]:
        """The hidden fields of a form: ``fields`` and a token bound to them."""
        return {**fields, FORM_TOKEN_FIELD: form_token(secret, purpose, *fields.values())}

    def forged(self, request: web.Request, form: dict[str, str], purpose: str, *bound: str) -> bool:
        """Did this POST not come from our own page (``purpose``, ``bound`` fields) in this
        browser?"""
        if foreign_origin(request, self._issuer):
            return True
        secret = request.cookies.get(FORM_COOKIE, "")
        values = [form.get(name, "") for name in bound]
        expected = form_token(secret, purpose, *values) if secret else ""
        return not secret or not hmac.compare_digest(form.get(FORM_TOKEN_FIELD, ""), expected)


def refused_form() -> web.HTTPForbidden:
    return web.HTTPForbidden(
        text="This form did not come from this server; open the page again and resend it.",
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )


def unavailable_page() -> web.Response:
    """A dependency (Redis, notify_svc) is down: try again, nothing to fix on the form."""
    response = page(
        "problem.html",
        status=503,
        title="Try again in a moment",
        message="The service cannot answer right now; try again in a moment.",
        next_url="",
        next_label="",
    )
    response.headers["Retry-After"] = "5"
    return response
