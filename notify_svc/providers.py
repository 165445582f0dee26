"""Email providers behind one interface: SMTP, SendGrid's HTTP API, and a fallback pair."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any, Protocol

import httpx

from notify_svc.smtp import DeliveryError, SmtpProvider

log = logging.getLogger("opsmesh.mail")


@dataclass(frozen=True, slots=True)
class Delivery:
    """Who accepted a message, and what they said."""

    provider: str
    reply: str


class Provider(Protocol):
    async def deliver(self, message: EmailMessage, recipients: list[str]) -> Delivery: ...

    async def close(self) -> None: ...


class Smtp:
    def __init__(self, smtp: SmtpProvider) -> None:
        self._smtp = smtp

    async def deliver(self, message: EmailMessage, recipients: list[str]) -> Delivery:
        return Delivery(provider="smtp", reply=await self._smtp.send(message, recipients))

    async def close(self) -> None:
        await self._smtp.close()


def _addresses(message: EmailMessage, header: str) -> list[dict[str, str]]:
    value = message.get(header)
    if value is None:
        return []
    found: list[dict[str, str]] = []
    for address in value.addresses:
        entry = {"email": address.addr_spec}
        if address.display_name:
            entry["name"] = address.display_name
        found.append(entry)
    return found


class SendGrid:
    """SendGrid's v3 mail/send API: 202 means accepted; 429 and 5xx are worth retrying."""

    def __init__(
        self, *, api_key: str, base_url: str = "https://api.sendgrid.com", timeout: float = 10.0
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
        )

    async def deliver(self, message: EmailMessage, recipients: list[str]) -> Delivery:
        to, cc = _addresses(message, "To"), _addresses(message, "Cc")
        shown = {entry["email"] for entry in to + cc}
        personalization: dict[str, Any] = {"to": to}
        if cc:
            personalization["cc"] = cc
        bcc = [{"email": address} for address in recipients if address not in shown]
        if bcc:
            personalization["bcc"] = bcc
        sender: Address = message["From"].addresses[0]
        message_id = str(message["Message-ID"])
        text = message.get_body(("plain",))
        html = message.get_body(("html",))
        payload = {
            "personalizations": [personalization],
            "from": {"email": sender.addr_spec, "name": sender.display_name},
            "subject": str(message["Subject"]),
            "content": [
                {"type": "text/plain", "value": text.get_content() if text else ""},
                {"type": "text/html", "value": html.get_content() if html else ""},
            ],
            # The stable Message-ID of the notification (one per notification, the same on a
            # resend) in the event webhooks' custom_args and as the request's idempotency key,
            # for SendGrid or a relay in front of it to recognize a resend.
            "custom_args": {"message_id": message_id},
            "headers": {"X-Opsmesh-Message-Id": message_id},
        }
        try:
            response = await self._http.post(
                "/v3/mail/send", json=payload, headers={"Idempotency-Key": message_id}
            )
        except httpx.TransportError as error:
            raise DeliveryError(f"SendGrid unreachable: {error}", permanent=False) from error
        if response.status_code == 202:
            return Delivery(provider="sendgrid", reply=response.headers.get("X-Message-Id", ""))
        detail = response.text[:300]
        permanent = response.status_code < 500 and response.status_code != 429
        raise DeliveryError(f"SendGrid {response.status_code} {detail}", permanent=permanent)

    async def close(self) -> None:
        await self._http.aclose()


class WithFallback:
    """The primary provider; the fallback only when the primary failed transiently."""

    def __init__(self, primary: Provider, fallback: Provider) -> None:
        self._primary = primary
        self._fallback = fallback

    async def deliver(self, message: EmailMessage, recipients: list[str]) -> Delivery:
        try:
            return await self._primary.deliver(message, recipients)
        except DeliveryError as error:
            if error.permanent:
                raise
            log.warning("primary mail provider failed (%s); trying the fallback", error)
            return await self._fallback.deliver(message, recipients)

    async def close(self) -> None:
        await self._primary.close()
        await self._fallback.close()
