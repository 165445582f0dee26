"""Recipients checked like an attacker would test them, and the MIME message built from them."""

from __future__ import annotations

from collections.abc import Sequence
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate

from email_validator import EmailNotValidError, validate_email

from mesh.errors import InvalidArgument
from notify_svc.rendering import RenderedEmail
from opsmesh.notify.v1 import notify_pb2

MAX_RECIPIENTS = 50
_MAX_NAME = 200
_FORBIDDEN = frozenset("\r\n\x00")


def checked_recipients(
    field: str, recipients: Sequence[notify_pb2.Recipient]
) -> list[notify_pb2.Recipient]:
    """Normalized recipients; INVALID_ARGUMENT for anything that could break a header."""
    checked = []
    for index, recipient in enumerate(recipients):
        where = f"{field}[{index}]"
        if any(c in _FORBIDDEN for c in recipient.address + recipient.name):
            raise InvalidArgument(f"{where} contains a line break or NUL", field=where)
        if len(recipient.name) > _MAX_NAME:
            raise InvalidArgument(f"{where}.name is longer than {_MAX_NAME}", field=f"{where}.name")
        try:
            valid = validate_email(recipient.address, check_deliverability=False)
        except EmailNotValidError as error:
            raise InvalidArgument(
                f"{where}.address is not an email address: {error}", field=f"{where}.address"
            ) from None
        checked.append(notify_pb2.Recipient(address=valid.normalized, name=recipient.name))
    return checked


def check_all(request: notify_pb2.SendEmailRequest) -> list[notify_pb2.Recipient]:
    if not request.to:
        raise InvalidArgument("at least one recipient in to", field="to")
    everyone = (
        checked_recipients("to", request.to)
        + checked_recipients("cc", request.cc)
        + checked_recipients("bcc", request.bcc)
    )
    if len(everyone) > MAX_RECIPIENTS:
        raise InvalidArgument(f"at most {MAX_RECIPIENTS} recipients in all", field="to")
    return everyone


def _header(recipients: Sequence[notify_pb2.Recipient]) -> list[Address]:
    return [Address(display_name=r.name, addr_spec=r.address) for r in recipients]


def build_message(
    *,
    notification_id: str,
    sender: str,
    request: notify_pb2.SendEmailRequest,
    rendered: RenderedEmail,
) -> tuple[EmailMessage, list[str]]:
    """The message and its envelope recipients (bcc is in the envelope only)."""
    to = checked_recipients("to", request.to)
    cc = checked_recipients("cc", request.cc)
    bcc = checked_recipients("bcc", request.bcc)
    message = EmailMessage()
    message["From"] = sender
    message["To"] = _header(to)
    if cc:
        message["Cc"] = _header(cc)
    message["Subject"] = rendered.subject
    message["Date"] = formatdate(localtime=False)
    # A stable Message-ID: a receiver can tell a redelivered email from a new one.
    message["Message-ID"] = f"<{notification_id}@opsmesh>"
    message["Content-Language"] = rendered.locale
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    return message, [r.address for r in (*to, *cc, *bcc)]
