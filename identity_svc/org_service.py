"""opsmesh.identity.v1.OrganizationService: members, roles, invitations and the audit log.

Every RPC acts in the organization the caller's token names. Who may do what is decided here,
from the memberships identity holds (not from the token's roles, which may be minutes old):
members may list members, the org's admins may do everything else. An invitation or member of
another organization is NOT_FOUND, like one that does not exist. Lowering a role or removing a
member ends that user's sessions in the org (revoked refresh families, published on the
revocation feed), so their next call is refused.
"""

from __future__ import annotations

import asyncio
import re

from identity_svc.accounts import Accounts
from identity_svc.audit import AuditEvent, AuditLog
from identity_svc.invitations import Invitation, Invitations
from identity_svc.oauth import OAuthServer
from identity_svc.organizations import Membership, Memberships, join_roles, parse_org_role
from mesh.context import Principal, current_principal
from mesh.errors import InvalidArgument, PermissionDenied
from mesh.pagination import decode_token, encode_token, page_size
from mesh.protos import timestamp_from_millis
from mesh.servicer import Context, parse_uuid
from opsmesh.identity.v1 import organization_pb2, organization_pb2_grpc

SERVICE_NAME = organization_pb2.DESCRIPTOR.services_by_name["OrganizationService"].full_name
_DEFAULT_PAGE = 50
_MAX_PAGE = 200
_EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")
_INVITATION_CURSOR = re.compile(r"\d{1,20}:[0-9a-f-]{36}")
_STATES = {
    "pending": organization_pb2.INVITATION_STATE_PENDING,
    "accepted": organization_pb2.INVITATION_STATE_ACCEPTED,
    "revoked": organization_pb2.INVITATION_STATE_REVOKED,
    "expired": organization_pb2.INVITATION_STATE_EXPIRED,
}


def _millis(seconds: float) -> int:
    return int(seconds * 1000)


def _invitation(invitation: Invitation) -> organization_pb2.Invitation:
    message = organization_pb2.Invitation(
        invitation_id=invitation.invitation_id,
        org_id=invitation.org_id,
        email=invitation.email,
        role=invitation.role,
        invited_by=invitation.invited_by,
        state=_STATES[invitation.state],
        created_at=timestamp_from_millis(_millis(invitation.created_at)),
        expires_at=timestamp_from_millis(_millis(invitation.expires_at)),
        sends=invitation.sends,
        accepted_by=invitation.accepted_by,
    )
    if invitation.ended_at is not None:
        message.ended_at.CopyFrom(timestamp_from_millis(_millis(invitation.ended_at)))
    return message


def _member(membership: Membership, email: str) -> organization_pb2.Member:
    message = organization_pb2.Member(
        user_id=membership.user_id, email=email, roles=sorted(membership.roles)
    )
    if membership.joined_at is not None:
        message.joined_at.CopyFrom(timestamp_from_millis(_millis(membership.joined_at)))
    return message


def _event(event: AuditEvent) -> organization_pb2.AuditEvent:
    return organization_pb2.AuditEvent(
        event_id=event.event_id,
        time=timestamp_from_millis(_millis(event.time)),
        actor=event.actor,
        action=event.action,
        target=event.target,
        details=dict(event.details),
    )


def _cursor(token: str, kind: str, pattern: re.Pattern[str]) -> str | None:
    cursor = decode_token(token, kind)
    if cursor is not None and pattern.fullmatch(cursor) is None:
        raise InvalidArgument("page_token is not a token returned by this list", field="page_token")
    return cursor


def _user_id(value: str) -> str:
    user = value.strip().lower()
    if not user or len(user) > 128:
        raise InvalidArgument("user_id is required (at most 128 characters)", field="user_id")
    return user


class OrganizationService(organization_pb2_grpc.OrganizationServiceServicer):
    def __init__(
        self,
        *,
        accounts: Accounts,
        invitations: Invitations,
        audit: AuditLog,
        oauth: OAuthServer,
    ) -> None:
        self._accounts = accounts
        self._memberships: Memberships = accounts.memberships
        self._invitations = invitations
        self._audit = audit
        self._oauth = oauth

    async def _member_of_org(self, caller: Principal) -> Membership:
        membership = await self._memberships.get(caller.org_id, caller.user_id)
        if membership is None:
            raise PermissionDenied("you are not a member of this organization")
        return membership

    async def _admin(self, caller: Principal) -> Membership:
        membership = await self._member_of_org(caller)
        if not membership.is_admin:
            raise PermissionDenied("only the organization's admins may do this")
        return membership

    async def ListMyOrganizations(
        self, request: organization_pb2.ListMyOrganizationsRequest, context: Context
    ) -> organization_pb2.ListMyOrganizationsResponse:
        caller = current_principal()
        limit = page_size(request.page_size, default=_DEFAULT_PAGE, maximum=_MAX_PAGE)
        after = decode_token(request.page_token, "orgs")
        memberships = await self._memberships.of_user(caller.user_id)
        ids = sorted(org for org in memberships if after is None or org > after)
        page = ids[:limit]
        names = await self._memberships.org_names(page)
        return organization_pb2.ListMyOrganizationsResponse(
            organizations=[
                organization_pb2.Organization(
                    org_id=org,
                    name=names[org],
                    roles=sorted(memberships[org]),
                    current=org == caller.org_id,
                )
                for org in page
            ],
            next_page_token=encode_token("orgs", page[-1]) if len(ids) > limit else "",
        )

    async def ListMembers(
        self, request: organization_pb2.ListMembersRequest, context: Context
    ) -> organization_pb2.ListMembersResponse:
        caller = current_principal()
        await self._member_of_org(caller)
        limit = page_size(request.page_size, default=_DEFAULT_PAGE, maximum=_MAX_PAGE)
        after = decode_token(request.page_token, "members")
        members = [
            m
            for m in await self._memberships.members(caller.org_id)
            if after is None or m.user_id > after
        ]
        page = members[:limit]
        accounts = await asyncio.gather(*(self._accounts.find(m.user_id) for m in page))
        return organization_pb2.ListMembersResponse(
            members=[
                _member(m, account.email if account else "")
                for m, account in zip(page, accounts, strict=True)
            ],
            next_page_token=encode_token("members", page[-1].user_id)
            if len(members) > limit
            else "",
        )

    async def InviteMember(
        self, request: organization_pb2.InviteMemberRequest, context: Context
    ) -> organization_pb2.InviteMemberResponse:
        caller = current_principal()
        parse_org_role(request.role)
        await self._admin(caller)
        invitation = await self._invitations.invite(
            org_id=caller.org_id, email=request.email, role=request.role, inviter=caller.user_id
        )
        return organization_pb2.InviteMemberResponse(invitation=_invitation(invitation))

    async def ListInvitations(
        self, request: organization_pb2.ListInvitationsRequest, context: Context
    ) -> organization_pb2.ListInvitationsResponse:
        caller = current_principal()
        await self._admin(caller)
        limit = page_size(request.page_size, default=_DEFAULT_PAGE, maximum=_MAX_PAGE)
        after = _cursor(request.page_token, "invitations", _INVITATION_CURSOR)

        def key(invitation: Invitation) -> tuple[int, str]:
            return (_millis(invitation.created_at), invitation.invitation_id)

        listed = [
            invitation
            for invitation in await self._invitations.of_org(caller.org_id)
            if (not request.pending_only or invitation.state == "pending")
            and (after is None or key(invitation) < _split_cursor(after))
        ]
        page = listed[:limit]
        next_token = ""
        if len(listed) > limit:
            created, invitation_id = key(page[-1])
            next_token = encode_token("invitations", f"{created}:{invitation_id}")
        return organization_pb2.ListInvitationsResponse(
            invitations=[_invitation(i) for i in page], next_page_token=next_token
        )

    async def ResendInvitation(
        self, request: organization_pb2.ResendInvitationRequest, context: Context
    ) -> organization_pb2.ResendInvitationResponse:
        caller = current_principal()
        invitation_id = parse_uuid(request.invitation_id, "invitation_id", kind="invitation id")
        await self._admin(caller)
        invitation = await self._invitations.resend(
            org_id=caller.org_id, invitation_id=invitation_id, actor=caller.user_id
        )
        return organization_pb2.ResendInvitationResponse(invitation=_invitation(invitation))

    async def RevokeInvitation(
        self, request: organization_pb2.RevokeInvitationRequest, context: Context
    ) -> organization_pb2.RevokeInvitationResponse:
        caller = current_principal()
        invitation_id = parse_uuid(request.invitation_id, "invitation_id", kind="invitation id")
        await self._admin(caller)
        invitation = await self._invitations.revoke(
            org_id=caller.org_id, invitation_id=invitation_id, actor=caller.user_id
        )
        return organization_pb2.RevokeInvitationResponse(invitation=_invitation(invitation))

    async def ChangeMemberRole(
        self, request: organization_pb2.ChangeMemberRoleRequest, context: Context
    ) -> organization_pb2.ChangeMemberRoleResponse:
        caller = current_principal()
        user = _user_id(request.user_id)
        role = parse_org_role(request.role)
        await self._admin(caller)
        change = await self._memberships.change_roles(caller.org_id, user, role)
        if change.lowered:  # their tokens carry the old roles: end those sessions now
            await self._oauth.revoke_user_families(user, caller.org_id)
        await self._audit.record(
            caller.org_id,
            actor=caller.user_id,
            action="member.role_changed",
            target=user,
            details={"role": role, "previous_roles": join_roles(change.previous)},
        )
        account = await self._accounts.find(user)
        return organization_pb2.ChangeMemberRoleResponse(
            member=_member(change.membership, account.email if account else "")
        )

    async def RemoveMember(
        self, request: organization_pb2.RemoveMemberRequest, context: Context
    ) -> organization_pb2.RemoveMemberResponse:
        caller = current_principal()
        user = _user_id(request.user_id)
        await self._admin(caller)
        previous = await self._memberships.remove(caller.org_id, user)
        await self._oauth.revoke_user_families(user, caller.org_id)
        await self._audit.record(
            caller.org_id,
            actor=caller.user_id,
            action="member.removed",
            target=user,
            details={"previous_roles": join_roles(previous)},
        )
        return organization_pb2.RemoveMemberResponse()

    async def ListAuditEvents(
        self, request: organization_pb2.ListAuditEventsRequest, context: Context
    ) -> organization_pb2.ListAuditEventsResponse:
        caller = current_principal()
        await self._admin(caller)
        limit = page_size(request.page_size, default=_DEFAULT_PAGE, maximum=_MAX_PAGE)
        before = _cursor(request.page_token, "audit", _EVENT_ID)
        events = await self._audit.page(caller.org_id, before=before, limit=limit + 1)
        page = events[:limit]
        return organization_pb2.ListAuditEventsResponse(
            events=[_event(e) for e in page],
            next_page_token=encode_token("audit", page[-1].event_id) if len(events) > limit else "",
        )


def _split_cursor(cursor: str) -> tuple[int, str]:
    created, _, invitation_id = cursor.partition(":")
    return int(created), invitation_id
