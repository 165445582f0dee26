"""opsmesh.identity.v1.IdentityService: who the caller is, as the identity service knows them."""

from __future__ import annotations

from identity_svc.accounts import Accounts
from mesh.context import Principal, current_principal
from mesh.servicer import Context
from opsmesh.identity.v1 import identity_pb2, identity_pb2_grpc

SERVICE_NAME = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
SERVICE_ROLE = "service"
"""The role of a service client's token (client credentials), acting for an organization."""


class IdentityService(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    async def GetCurrentUser(
        self, request: identity_pb2.GetCurrentUserRequest, context: Context
    ) -> identity_pb2.GetCurrentUserResponse:
        caller = current_principal()
        return identity_pb2.GetCurrentUserResponse(
            user=identity_pb2.User(
                user_id=caller.user_id,
                org_id=caller.org_id,
                roles=sorted(caller.roles),
                account_kind=await self._account_kind(caller),
            )
        )

    async def _account_kind(self, caller: Principal) -> identity_pb2.AccountKind:
        if SERVICE_ROLE in caller.roles:
            return identity_pb2.ACCOUNT_KIND_SERVICE
        account = await self._accounts.find(caller.user_id)
        # An account that is no member of the token's organization is not this caller's.
        if account is None or caller.org_id not in account.orgs:
            return identity_pb2.ACCOUNT_KIND_NONE
        return identity_pb2.ACCOUNT_KIND_LOCAL
