"""Only the edge may ask for rate limit decisions.

A process that could call ratelimit_svc could spend any user's (or every sign-in's) budget, so
Envoy proves itself with a shared secret it sends as ``initial_metadata`` on its rate limit
gRPC service (envoy/envoy.yaml). ``make up`` generates the
secret into the run folder; Kubernetes keeps it in the Secret ``opsmesh-ratelimit-edge``.
Health and reflection stay public (mesh.auth.PUBLIC_METHOD_PREFIXES) for probes.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Mapping

from mesh.context import Principal
from mesh.errors import Unauthenticated
from mesh.settings import setting
from opsmesh.errors.v1 import errors_pb2

log = logging.getLogger(__name__)

EDGE_CREDENTIAL_METADATA = "x-opsmesh-edge-credential"
EDGE_CREDENTIAL_VARIABLE = "OPSMESH_RATELIMIT_EDGE_CREDENTIAL"
CREDENTIAL_SHAPE = re.compile(r"[A-Za-z0-9_~.-]{16,}")
"""URL-safe characters (openssl rand -hex 32, secrets.token_urlsafe): the Kubernetes edge pod
writes it into Envoy's config with sed, which needs nothing quoted."""
EDGE_PRINCIPAL = Principal(user_id="envoy", org_id="mesh", roles=frozenset({"edge"}))


def _edge_credential(raw: str) -> str:
    if not CREDENTIAL_SHAPE.fullmatch(raw):
        raise ValueError("expected 16+ letters, digits or '_~.-' (openssl rand -hex 32)")
    return raw


def edge_credential_setting() -> str:
    """The secret the edge must show; empty: any caller is believed (tests on one host)."""
    return setting(
        "OPSMESH_RATELIMIT_EDGE_CREDENTIAL",
        "",
        _edge_credential,
        doc="empty: any caller",
        secret=True,
    )


class EdgeCredentialAuthenticator:
    """Admits calls that carry the edge's secret (compared in constant time)."""

    def __init__(self, credential: str) -> None:
        self._expected = credential.encode()

    async def authenticate(self, metadata: Mapping[str, str], method: str) -> Principal:
        shown = metadata.get(EDGE_CREDENTIAL_METADATA)
        if not shown:
            raise Unauthenticated(
                f"only the edge may call this service ({EDGE_CREDENTIAL_METADATA} is missing)",
                reason=errors_pb2.ERROR_REASON_MISSING_CREDENTIALS,
            )
        if not hmac.compare_digest(shown.encode(), self._expected):
            raise Unauthenticated(
                f"{EDGE_CREDENTIAL_METADATA} is not the edge's credential",
                reason=errors_pb2.ERROR_REASON_INVALID_TOKEN,
            )
        return EDGE_PRINCIPAL


class AnyCaller:
    """Believes every caller: only where nothing untrusted can connect (the tests' own hosts)."""

    def __init__(self) -> None:
        log.warning(
            "%s is not set: any process that reaches this port can spend rate limits",
            EDGE_CREDENTIAL_VARIABLE,
        )

    async def authenticate(self, metadata: Mapping[str, str], method: str) -> Principal:
        return EDGE_PRINCIPAL


def edge_authenticator(credential: str) -> EdgeCredentialAuthenticator | AnyCaller:
    return EdgeCredentialAuthenticator(credential) if credential else AnyCaller()
