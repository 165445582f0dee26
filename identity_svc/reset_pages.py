"""The password reset pages: "Forgot password?" and the page its emailed link opens.

* ``GET/POST /account/password/forgot``: a user name or email address. Before answering,
  the request only takes its throttle counters (per name as typed and per client address:
  one script, whatever the name); the answer is the same page for every name. Whether an
  account matches is looked up after the answer, where the account's own budget (its user
  name and email together) is taken and the link is made and mailed, so neither the page
  nor the time to answer says whether the account exists.
* ``GET /account/password/reset?token=...``: the link from the email. It shows a form that
  carries the token in a hidden field; the form posts to ``/account/password/reset`` with
  no token in the URL. Every page sends ``Referrer-Policy: no-referrer``, and neither the
  identity service nor the edge writes an access log, so a token is only ever in the
  email and in the one request that opens the page.
* ``POST /account/password/reset``: the new password (the one policy,
  identity_svc/passwords.py). The link is used once (atomically); every refresh-token
  family of the account is revoked and published on the revocation feed, so every session
  ends at its next call; the owner gets the ``password_changed`` email.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from grpc import aio

from identity_svc.accounts import Account, Accounts, address_key
from identity_svc.audit import AuditLog
from identity_svc.mail import Mailer
from identity_svc.oauth import OAuthServer
from identity_svc.organizations import Memberships
from identity_svc.passwords import WeakPassword, check_password
from identity_svc.reset import LinkState, ResetLinkRefused, ResetLinks
from identity_svc.web import FORM_COOKIE, FormGuard, page, refused_form, unavailable_page
from mesh.errors import Unavailable

log = logging.getLogger("opsmesh.identity.reset")

FORGOT_PATH = "/account/password/forgot"
RESET_PATH = "/account/password/reset"
_LINK_PROBLEMS = {
    LinkState.USED: ("This link was already used", "Each reset link works once."),
    LinkState.EXPIRED: ("This link has expired", "A reset link works for a limited time."),
    LinkState.REPLACED: (
        "This link was replaced",
        "A newer reset link was sent for this account; only the newest one works.",
    ),
    LinkState.UNKNOWN: (
        "This link does not work",
        "It may be incomplete (copy the whole link from the email) or too old.",
    ),
}


class PasswordResetPages:
    def __init__(
        self,
        *,
        issuer: str,
        accounts: Accounts,
        links: ResetLinks,
        oauth: OAuthServer,
        mailer: Mailer,
        client_address: Callable[[web.Request], str],
        audit: AuditLog,
        memberships: Memberships,
    ) -> None:
        self._issuer = issuer
        self._accounts = accounts
        self._links = links
        self._oauth = oauth
        self._mailer = mailer
        self._client_address = client_address
        self._audit = audit
        self._memberships = memberships
        self._guard = FormGuard(issuer)
        self._background: set[asyncio.Task[None]] = set()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(FORGOT_PATH, self._forgot_page)
        app.router.add_post(FORGOT_PATH, self._forgot)
        app.router.add_get(RESET_PATH, self._reset_page)
        app.router.add_post(RESET_PATH, self._reset)

    # --- forgot password ------------------------------------------------------------------

    def _forgot_form(
        self, secret: str, *, login: str = "", error: str = "", status: int = 200
    ) -> web.Response:
        response = page(
            "forgot_password.html",
            status=status,
            title="Reset your password",
            sent=False,
            login=login,
            error=error,
            hidden=self._guard.hidden(secret, "forgot"),
            ttl_minutes=self._ttl_minutes(),
        )
        self._guard.remember(response, secret)
        return response

    def _ttl_minutes(self) -> int:
        return max(1, round(self._links.settings.link_ttl / 60))

    async def _forgot_page(self, request: web.Request) -> web.Response:
        return self._forgot_form(self._guard.secret(request))

    async def _forgot(self, request: web.Request) -> web.Response:
        form = {name: str(value) for name, value in (await request.post()).items()}
        if self._guard.forged(request, form, "forgot"):
            raise refused_form()
        secret = request.cookies[FORM_COOKIE]
        login = form.get("login", "").strip()[:254]
        if not login:
            return self._forgot_form(
                secret, error="Enter your user name or email address.", status=400
            )
        address = self._client_address(request)
        try:
            # Before the answer only what is the same for every name: one throttle script
            # over the name as typed and the address. Whether an account matches is looked
            # up after the answer (_send_link), so neither the page nor its timing tells.
            keys, limits = self._links.request_counters(login, address_key(address))
            wait = await self._accounts.reserve_attempts(
                keys, limits, window=self._links.settings.window
            )
        except Unavailable:
            return unavailable_page()
        if wait:
            response = self._forgot_form(
                secret,
                login=login,
                error="Too many reset requests; try again later.",
                status=429,
            )
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        self._spawn(self._send_link(login, address))
        return page(
            "forgot_password.html",
            title="Check your email",
            sent=True,
            login=login,
            ttl_minutes=self._ttl_minutes(),
        )

    async def _send_link(self, login: str, address: str) -> None:
        account = await self._accounts.find_by_login(login)
        if account is None or not account.email:
            return
        # The account's own budget: its user name and its email address count together.
        keys, limits = self._links.account_counter(account.user_id)
        if await self._accounts.reserve_attempts(keys, limits, window=self._links.settings.window):
            log.info("reset link for %s not sent: too many requests", account.user_id)
            return
        token = await self._links.issue(account.user_id)
        await self._mailer.send_email(
            template="password_reset",
            to=account.email,
            org_id=account.org_id,
            data={
                "reset_url": f"{self._issuer}{RESET_PATH}?token={token}",
                "expires_in_minutes": self._ttl_minutes(),
                "user_name": account.user_id,
                "request_ip": address,
            },
        )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs ``work`` after the answer; a failure is logged (without any token) and the
        person asks again."""
        task = asyncio.get_running_loop().create_task(_logged(work))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Waits for the emails still on their way (at shutdown)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=10)

    # --- the link ---------------------------------------------------------------------------

    async def _reset_page(self, request: web.Request) -> web.Response:
        token = request.query.get("token", "")
        try:
            user_id = await self._links.check(token)
            account = await self._accounts.find(user_id)
        except ResetLinkRefused as refused:
            return _link_problem(refused.state)
        except Unavailable:
            return unavailable_page()
        if account is None:
            return _link_problem(LinkState.UNKNOWN)
        secret = self._guard.secret(request)
        return self._reset_form(secret, token, account.user_id)

    def _reset_form(
        self, secret: str, token: str, user_id: str, *, error: str = "", status: int = 200
    ) -> web.Response:
        response = page(
            "reset_password.html",
            status=status,
            title="Choose a new password",
            user_name=user_id,
            error=error,
            hidden=self._guard.hidden(secret, "reset", token=token),
        )
        self._guard.remember(response, secret)
        return response

    async def _reset(self, request: web.Request) -> web.Response:
        form = {name: str(value) for name, value in (await request.post()).items()}
        if self._guard.forged(request, form, "reset", "token"):
            raise refused_form()
        secret = request.cookies[FORM_COOKIE]
        token, password = form.get("token", ""), form.get("password", "")
        address = self._client_address(request)
        try:
            account = await self._accounts.find(await self._links.check(token))
            if account is None:
                return _link_problem(LinkState.UNKNOWN)
            if password != form.get("confirm", ""):
                return self._reset_form(
                    secret, token, account.user_id, error="The passwords differ.", status=400
                )
            try:
                check_password(password, user_id=account.user_id, email=account.email)
            except WeakPassword as weak:
                return self._reset_form(
                    secret, token, account.user_id, error=weak.message, status=400
                )
            await self._links.use(token)  # once: a second submission stops here
            # Revoked before and after the new password is set: a session started with the
            # old password in between is caught by the second sweep.
            revoked = await self._oauth.revoke_user_families(account.user_id)
            await self._accounts.set_password(account.user_id, password)
            revoked += await self._oauth.revoke_user_families(account.user_id)
        except ResetLinkRefused as refused:
            return _link_problem(refused.state)
        except Unavailable:
            return unavailable_page()
        log.info("password reset for %s; %d sessions revoked", account.user_id, revoked)
        await self._record(account, address)
        if account.email:
            self._spawn(
                self._mailer.send_email(
                    template="password_changed",
                    to=account.email,
                    org_id=account.org_id,
                    data={
                        "user_name": account.user_id,
                        "changed_at": datetime.now(UTC).isoformat(timespec="seconds"),
                        "request_ip": address,
                        "forgot_password_url": f"{self._issuer}{FORGOT_PATH}",
                    },
                )
            )
        return page(
            "done.html",
            title="Your password is changed",
            message=(
                "Every device that was signed in to your account has been signed out. "
                "Sign in again with the new password."
            ),
            next_url="/",
            next_label="Sign in",
        )

    async def _record(self, account: Account, address: str) -> None:
        """Audits the reset in every organization of the account (its admins read it there)."""
        try:
            orgs = set(await self._memberships.of_user(account.user_id)) or {account.org_id}
            for org_id in sorted(orgs):
                await self._audit.record(
                    org_id,
                    actor=account.user_id,
                    action="password.reset",
                    target=account.user_id,
                    details={"client_address": address},
                )
        except Unavailable:
            # The password is changed and the sessions are gone; only the record is missing.
            log.warning("the audit log missed the password reset of %s", account.user_id)


async def _logged(work: Awaitable[None]) -> None:
    try:
        await work
    except Exception as error:  # noqa: BLE001 - a background task has no caller to tell
        # The class and status only: a message could quote the request, and with it a link.
        code = error.code().name if isinstance(error, aio.AioRpcError) else ""
        log.warning("a password reset follow-up failed: %s %s", type(error).__name__, code)


def _link_problem(state: LinkState) -> web.Response:
    title, message = _LINK_PROBLEMS[state]
    return page(
        "problem.html",
        status=404 if state is LinkState.UNKNOWN else 410,
        title=title,
        message=f"{message} Ask for a new link if you still need to reset your password.",
        next_url=FORGOT_PATH,
        next_label="Ask for a new link",
    )
