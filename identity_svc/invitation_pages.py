"""The invitation page: ``GET/POST /invitations/accept`` (the link of the ``org_invitation``
email is ``<issuer>/invitations/accept?token=...``).

The GET shows who invites whom to which organization, and either a form to create the
account (a new person: user name and a password under the one policy) or a sign-in form
(an account with the invited address exists). The token travels on in a hidden field: the
POST's URL has none, and the page sends ``Referrer-Policy: no-referrer`` like every
identity page. An expired, revoked, used or unknown token gets a page that says so, and
never a membership: the invitations module (identity_svc/invitations.py) checks and uses
the token atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from identity_svc.accounts import Accounts, SignInThrottled
from identity_svc.passwords import WeakPassword, check_password
from identity_svc.web import FORM_COOKIE, FormGuard, page, refused_form, unavailable_page
from mesh.errors import AlreadyExists, InvalidArgument, ResourceExhausted, Unavailable

ACCEPT_PATH = "/invitations/accept"
_PROBLEMS = {
    "expired": ("This invitation has expired", "Ask the person who invited you for a new one."),
    "revoked": ("This invitation was withdrawn", "Ask the organization's administrators."),
    "used": (
        "This invitation was already accepted",
        "Each invitation link works once. If it was you, sign in.",
    ),
    "foreign": (
        "This invitation is for another email address",
        "Sign in with the account of the address the invitation was sent to, or ask for an "
        "invitation to your own address.",
    ),
    "unknown": (
        "This invitation link does not work",
        "It may be incomplete (copy the whole link from the email) or replaced by a newer one.",
    ),
}


class InvitationView(Protocol):
    """What the page shows of a live invitation."""

    @property
    def org_name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def email(self) -> str: ...
    @property
    def inviter(self) -> str: ...
    @property
    def account_exists(self) -> bool: ...


class Invitations(Protocol):
    """identity_svc/invitations.py, as the page uses it. Refusals raise an exception with a
    ``state`` attribute: ``expired``, ``revoked``, ``used`` or ``unknown``."""

    async def preview(self, token: str) -> InvitationView: ...

    async def accept_new_account(self, token: str, *, user_id: str, password: str) -> Any: ...

    async def accept_existing(self, token: str, *, user_id: str) -> Any: ...


class InvitationPages:
    def __init__(
        self,
        *,
        issuer: str,
        accounts: Accounts,
        invitations: Invitations,
        refused: type[Exception],
        client_address: Callable[[web.Request], str],
    ) -> None:
        self._accounts = accounts
        self._invitations = invitations
        self._refused = refused
        self._client_address = client_address
        self._guard = FormGuard(issuer)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(ACCEPT_PATH, self._page)
        app.router.add_post(ACCEPT_PATH, self._accept)

    async def drain(self) -> None:
        """Nothing runs after an answer here."""

    def _form(
        self,
        secret: str,
        token: str,
        view: InvitationView,
        *,
        username: str = "",
        error: str = "",
        status: int = 200,
    ) -> web.Response:
        response = page(
            "invitation_accept.html",
            status=status,
            title=f"Join {view.org_name}",
            org_name=view.org_name,
            role=view.role,
            email=view.email,
            inviter=view.inviter,
            existing=view.account_exists,
            username=username,
            error=error,
            hidden=self._guard.hidden(secret, "invitation", token=token),
        )
        self._guard.remember(response, secret)
        return response

    async def _page(self, request: web.Request) -> web.Response:
        token = request.query.get("token", "")
        try:
            view = await self._invitations.preview(token)
        except Unavailable:
            return unavailable_page()
        except self._refused as refused:
            return _problem(str(getattr(refused, "state", "unknown")))
        return self._form(self._guard.secret(request), token, view)

    async def _accept(self, request: web.Request) -> web.Response:
        form = {name: str(value) for name, value in (await request.post()).items()}
        if self._guard.forged(request, form, "invitation", "token"):
            raise refused_form()
        secret = request.cookies[FORM_COOKIE]
        token = form.get("token", "")
        username = form.get("username", "").strip().lower()[:64]
        password = form.get("password", "")
        try:
            view = await self._invitations.preview(token)
            if view.account_exists:
                return await self._join_existing(request, secret, token, view, username, password)
            return await self._join_new(secret, token, view, username, password, form)
        except Unavailable:
            return unavailable_page()
        except self._refused as refused:
            return _problem(str(getattr(refused, "state", "unknown")))

    async def _join_existing(
        self,
        request: web.Request,
        secret: str,
        token: str,
        view: InvitationView,
        username: str,
        password: str,
    ) -> web.Response:
        try:
            account = await self._accounts.verify(username, password, self._client_address(request))
        except ResourceExhausted as refused:
            message = (
                "Too many failed sign-ins; try again later."
                if isinstance(refused, SignInThrottled)
                else "The server is busy; try again in a moment."
            )
            response = self._form(secret, token, view, username=username, error=message, status=429)
            response.headers["Retry-After"] = str(int(refused.retry_after or 1) + 1)
            return response
        if account is None:
            return self._form(
                secret, token, view, username=username, error="Wrong user or password.", status=401
            )
        await self._invitations.accept_existing(token, user_id=account.user_id)
        return _joined(view)

    async def _join_new(
        self,
        secret: str,
        token: str,
        view: InvitationView,
        username: str,
        password: str,
        form: dict[str, str],
    ) -> web.Response:
        def again(error: str) -> web.Response:
            return self._form(secret, token, view, username=username, error=error, status=400)

        if password != form.get("confirm", ""):
            return again("The passwords differ.")
        try:
            check_password(password, user_id=username, email=view.email)
            await self._invitations.accept_new_account(token, user_id=username, password=password)
        except WeakPassword as weak:
            return again(weak.message)
        except AlreadyExists:
            return again("This user name is taken; choose another.")
        except InvalidArgument as invalid:
            return again(invalid.message)
        return _joined(view)


def _joined(view: InvitationView) -> web.Response:
    return page(
        "done.html",
        title=f"Welcome to {view.org_name}",
        message=f"You are a member of {view.org_name} as {view.role}. Sign in to start.",
        next_url="/",
        next_label="Sign in",
    )


def _problem(state: str) -> web.Response:
    if state not in _PROBLEMS:
        state = "unknown"
    title, message = _PROBLEMS[state]
    return page(
        "problem.html",
        # Gone (410) for a real invitation that no longer works; 404 for none; 403 for another's.
        status={"unknown": 404, "foreign": 403}.get(state, 410),
        title=title,
        message=message,
        next_url="/",
        next_label="Go to opsmesh",
    )
