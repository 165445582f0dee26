"""Sending email over SMTP with aiosmtplib: pooled connections, TLS, PIPELINING when the server
offers it (``notify_svc.pipelining``), clear failure kinds."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import parseaddr

import aiosmtplib

from mesh.settings import choice, integer, seconds, string
from notify_svc.pipelining import PipeliningSMTP

log = logging.getLogger("opsmesh.smtp")


class DeliveryError(Exception):
    """A message was not accepted; ``permanent`` says whether trying again can help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, kw_only=True)
class SmtpSettings:
    host: str = string("OPSMESH_SMTP_HOST", "127.0.0.1")
    port: int = integer("OPSMESH_SMTP_PORT", 2525, minimum=1, maximum=65535)
    security: str = choice("OPSMESH_SMTP_SECURITY", "none", ("none", "starttls", "tls"))
    """none, starttls or tls (implicit TLS, usually port 465)."""
    ca_file: str = string("OPSMESH_SMTP_CA_FILE")
    """CA bundle to verify the server with (an internal relay's own CA); empty: the system's."""
    username: str = string("OPSMESH_SMTP_USERNAME")
    password: str = string("OPSMESH_SMTP_PASSWORD")
    timeout: float = seconds("OPSMESH_SMTP_TIMEOUT", 10.0, minimum=0.1, maximum=300)
    pool_size: int = integer("OPSMESH_SMTP_POOL_SIZE", 16, minimum=1, maximum=100)
    sender: str = string("OPSMESH_MAIL_FROM", "opsmesh <noreply@opsmesh.localhost>")


class SmtpProvider:
    """Sends through a small pool of open SMTP connections (opened on demand, reused)."""

    name = "smtp"

    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings
        self._idle: asyncio.LifoQueue[PipeliningSMTP] = asyncio.LifoQueue()
        self._slots = asyncio.Semaphore(settings.pool_size)

    async def _connect(self) -> PipeliningSMTP:
        settings = self._settings
        client = PipeliningSMTP(
            hostname=settings.host,
            port=settings.port,
            timeout=settings.timeout,
            use_tls=settings.security == "tls",
            start_tls=settings.security == "starttls",
            tls_context=(
                ssl.create_default_context(cafile=settings.ca_file or None)
                if settings.security != "none"
                else None
            ),
        )
        await client.connect()
        if settings.username:
            await client.login(settings.username, settings.password)
        return client

    async def send(self, message: EmailMessage, recipients: list[str]) -> str:
        """Sends ``message``; the server's reply. Raises DeliveryError."""
        async with self._slots:
            client = None
            while not self._idle.empty() and client is None:
                candidate = self._idle.get_nowait()
                if candidate.is_connected:
                    client = candidate
            try:
                if client is None:
                    client = await self._connect()
                errors, reply = await client.send_message(
                    message, sender=_address_of(self._settings.sender), recipients=recipients
                )
            except aiosmtplib.SMTPRecipientsRefused as error:
                await _close(client)
                replies = "; ".join(
                    f"{r.recipient}: {r.code} {r.message}" for r in error.recipients
                )
                permanent = all(500 <= r.code < 600 for r in error.recipients)
                raise DeliveryError(
                    f"recipients refused: {replies}", permanent=permanent
                ) from error
            except aiosmtplib.SMTPResponseException as error:
                await _close(client)
                raise DeliveryError(
                    f"SMTP {error.code} {error.message}", permanent=500 <= error.code < 600
                ) from error
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
                await _close(client)
                raise DeliveryError(
                    f"SMTP server unreachable: {type(error).__name__}: {error}", permanent=False
                ) from error
            except BaseException:
                # Cancelled mid-conversation: the connection is in an unknown SMTP state, so it
                # cannot go back to the pool; drop it now rather than leak an open socket.
                _abandon(client)
                raise
            if errors:
                log.warning("some recipients were refused: %s", errors)
            self._idle.put_nowait(client)
            return reply

    async def close(self) -> None:
        while not self._idle.empty():
            await _close(self._idle.get_nowait())


def _address_of(sender: str) -> str:
    return parseaddr(sender)[1]


def _abandon(client: aiosmtplib.SMTP | None) -> None:
    """Closes the socket at once (no QUIT: there may be no time, nor a sane state, for one)."""
    if client is not None:
        client.close()


async def _close(client: aiosmtplib.SMTP | None) -> None:
    if client is None:
        return
    try:
        if client.is_connected:
            await client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()
