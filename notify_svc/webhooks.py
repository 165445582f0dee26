"""Webhooks that turn outside events into emails: billing events and Alertmanager alerts.

* ``POST /webhooks/billing``: a JSON event signed like Stripe's: header
  ``Opsmesh-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``.
  A bad signature is 401; a timestamp outside the tolerance is 400 (a replay of a
  captured request); a repeated event id gives the same notification and no
  second email (its id is the idempotency key).
* ``POST /webhooks/alertmanager``: Alertmanager's webhook (version 4) with
  ``Authorization: Bearer <token>``; every firing alert becomes an alert email to
  the configured recipients, once per alert and start time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mesh.context import Principal
from mesh.errors import OpsmeshError, Unavailable
from mesh.settings import fixed, port_number, seconds, string, words
from notify_svc.authz import ALERT_WEBHOOK_ROLE, BILLING_WEBHOOK_ROLE
from opsmesh.notify.v1 import notify_pb2

log = logging.getLogger("opsmesh.webhooks")

SIGNATURE_HEADER = "Opsmesh-Signature"
MAX_BODY = 64 * 1024
BILLING_TEMPLATES = {
    "subscription.created": "billing_subscription_created",
    "subscription.changed": "billing_subscription_changed",
    "payment.succeeded": "billing_payment_succeeded",
    "payment.failed": "billing_payment_failed",
    "invoice.available": "billing_invoice_available",
}

Send = Callable[[Principal, notify_pb2.SendEmailRequest], Awaitable[notify_pb2.Notification]]


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    host: str = fixed("127.0.0.1", why="the service's OPSMESH_HOST, given by notify_svc")
    port: int = port_number("OPSMESH_WEBHOOK_PORT", 8093, doc="0 turns the webhook server off")
    """0 turns the webhook server off."""
    billing_secret: str = string("OPSMESH_BILLING_WEBHOOK_SECRET")
    tolerance: float = seconds("OPSMESH_WEBHOOK_TOLERANCE", 300.0, minimum=1, maximum=3600)
    alert_token: str = string("OPSMESH_ALERT_WEBHOOK_TOKEN")
    alert_org: str = string("OPSMESH_ALERT_ORG")
    alert_emails: tuple[str, ...] = words("OPSMESH_ALERT_EMAILS")


def billing_signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Opsmesh-Signature`` header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Webhooks:
    def __init__(self, settings: WebhookSettings, send: Send) -> None:
        self._settings = settings
        self._send = send
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/webhooks/billing", self._billing)
        app.router.add_post("/webhooks/alertmanager", self._alertmanager)
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0

    async def start(self) -> None:
        if self._settings.port == 0:
            return
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.host, self._settings.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("webhooks on %s:%d", self._settings.host, self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()

    def _verify(self, request: web.Request, body: bytes) -> web.Response | None:
        secret = self._settings.billing_secret
        if not secret:
            return _error(503, "billing webhooks are not configured")
        header = request.headers.get(SIGNATURE_HEADER, "")
        parts: dict[str, list[str]] = {}
        for item in header.split(","):
            name, _, value = item.strip().partition("=")
            parts.setdefault(name, []).append(value)
        try:
            timestamp = int(parts.get("t", [""])[0])
        except ValueError:
            return _error(401, f"missing or malformed {SIGNATURE_HEADER} header")
        expected = billing_signature(secret, timestamp, body).rsplit("v1=", 1)[1]
        if not any(hmac.compare_digest(expected, given) for given in parts.get("v1", [])):
            return _error(401, "signature does not match")
        if abs(time.time() - timestamp) > self._settings.tolerance:
            return _error(400, "timestamp outside the tolerance: a replayed or delayed request")
        return None

    async def _deliver(self, principal: Principal, request: notify_pb2.SendEmailRequest) -> str:
        notification = await self._send(principal, request)
        return notification.id

    async def _billing(self, request: web.Request) -> web.Response:
        body = await request.read()
        refused = self._verify(request, body)
        if refused is not None:
            return refused
        try:
            event = json.loads(body)
            template = BILLING_TEMPLATES[event["type"]]
            org_id = str(event["org_id"])
            recipients = [notify_pb2.Recipient(address=str(a)) for a in event["recipients"]]
            data: Mapping[str, Any] = event.get("data", {})
            event_id = str(event["id"])
        except (ValueError, KeyError, TypeError) as error:
            return _error(400, f"not a billing event: {type(error).__name__} {error}")
        send = notify_pb2.SendEmailRequest(
            template=template,
            locale=str(event.get("locale", "")),
            to=recipients,
            idempotency_key=f"billing:{event_id}"[:128],
        )
        send.data.update(dict(data))
        return await self._accept(
            Principal("billing-webhook", org_id, frozenset({BILLING_WEBHOOK_ROLE})), [send]
        )

    async def _accept(
        self, principal: Principal, requests: list[notify_pb2.SendEmailRequest]
    ) -> web.Response:
        try:
            ids = [await self._deliver(principal, one) for one in requests]
        except Unavailable as error:
            return _error(503, error.message)
        except OpsmeshError as error:
            return _error(422, error.message)
        return web.json_response({"notification_ids": ids}, status=202)

    async def _alertmanager(self, request: web.Request) -> web.Response:
        token = self._settings.alert_token
        if not token or not self._settings.alert_org or not self._settings.alert_emails:
            return _error(503, "alert webhooks are not configured")
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "bearer token does not match")
        try:
            payload = json.loads(await request.read())
            alerts = [a for a in payload["alerts"] if a.get("status") == "firing"]
        except (ValueError, KeyError, TypeError) as error:
            return _error(400, f"not an Alertmanager webhook: {type(error).__name__} {error}")
        recipients = [notify_pb2.Recipient(address=a) for a in self._settings.alert_emails]
        sends = []
        for alert in alerts:
            labels = alert.get("labels", {})
            annotations = alert.get("annotations", {})
            send = notify_pb2.SendEmailRequest(
                template="alert_notification",
                to=recipients,
                idempotency_key=f"alert:{alert.get('fingerprint', '')}:{alert.get('startsAt', '')}"[
                    :128
                ],
            )
            data: dict[str, Any] = {
                "alert_name": labels.get("alertname", "alert"),
                "severity": labels.get("severity", "unknown"),
                "summary": annotations.get("summary") or labels.get("alertname", "alert"),
                "labels": [f"{k}={v}" for k, v in sorted(labels.items())],
            }
            if annotations.get("description"):
                data["description"] = annotations["description"]
            if alert.get("startsAt"):
                data["started_at"] = alert["startsAt"]
            if str(alert.get("generatorURL", "")).startswith(("http://", "https://")):
                data["dashboard_url"] = alert["generatorURL"]
            send.data.update(data)
            sends.append(send)
        alertmanager = Principal(
            "alertmanager", self._settings.alert_org, frozenset({ALERT_WEBHOOK_ROLE})
        )
        return await self._accept(alertmanager, sends)
