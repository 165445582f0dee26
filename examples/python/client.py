"""A small opsmesh client in Python (grpc.aio): health, a session, and an error's details.

    python examples/python/client.py --addr localhost:50051 --token "$TOKEN"
    python examples/python/client.py --addr localhost:8080 --token "$TOKEN" \
        --health-addr localhost:50051

Needs grpcio, grpcio-health-checking, googleapis-common-protos and gen/python on the path
(the repository's .venv has them all).
"""

from __future__ import annotations

import argparse
import asyncio

from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from opsmesh.errors.v1 import errors_pb2
from opsmesh.session.v1 import session_pb2, session_pb2_grpc


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="localhost:8080", help="the edge, or session_svc")
    parser.add_argument("--health-addr", help="where to check gRPC health (default --addr)")
    parser.add_argument("--token", help="access token, sent as 'authorization: Bearer ...'")
    parser.add_argument("--user", help="x-opsmesh-user-id (trusted-headers mode only)")
    parser.add_argument("--org", help="x-opsmesh-org-id")
    args = parser.parse_args()
    # Every call carries the caller's identity: a bearer token, or the trusted headers.
    metadata: list[tuple[str, str]] = []
    if args.token:
        metadata.append(("authorization", f"Bearer {args.token}"))
    if args.user:
        metadata += [("x-opsmesh-user-id", args.user), ("x-opsmesh-org-id", args.org or "")]

    async with aio.insecure_channel(args.health_addr or args.addr) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        print("health:", health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))

    async with aio.insecure_channel(args.addr) as channel:
        sessions = session_pb2_grpc.SessionServiceStub(channel)
        created = await sessions.CreateSession(
            session_pb2.CreateSessionRequest(title="python example"), metadata=metadata
        )
        print("created session", created.session.id, "version", created.session.version)
        got = await sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=created.session.id), metadata=metadata
        )
        print("got session", got.session.title)

        # Errors carry google.rpc details in the grpc-status-details-bin trailer.
        try:
            await sessions.GetSession(
                session_pb2.GetSessionRequest(session_id="not-a-uuid"), metadata=metadata
            )
        except aio.AioRpcError as error:
            print("error:", error.code().name, error.details())
            status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an aio call works
            for detail in status.details if status else ():
                info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
                if detail.Unpack(info):
                    print("  ErrorInfo reason", info.reason, "domain", info.domain)
                    # Reasons are the contract's ErrorReason names without ERROR_REASON_.
                    reason = errors_pb2.ErrorReason.Value(f"ERROR_REASON_{info.reason}")
                    assert reason == errors_pb2.ERROR_REASON_INVALID_ARGUMENT
                elif detail.Unpack(bad):
                    for violation in bad.field_violations:
                        print("  BadRequest field", f"{violation.field}:", violation.description)
        else:
            raise SystemExit("expected INVALID_ARGUMENT")


if __name__ == "__main__":
    asyncio.run(main())
