import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createRouterTransport, type ServiceImpl } from "@connectrpc/connect";
import { render, screen, waitFor, within } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { describe, expect, it, vi } from "vitest";
import { BadRequestSchema } from "@gen/google/rpc/error_details_pb.js";
import {
  AuditEventSchema,
  InvitationSchema,
  InvitationState,
  MemberSchema,
  OrganizationService,
  type AuditEvent,
  type Invitation,
  type Member,
} from "@gen/opsmesh/identity/v1/organization_pb.js";
import { createApi } from "../api/transport";
import { deferred } from "../test/deferred";
import { describeAction, emailProblem, MembersScreen, primaryRole } from "./MembersScreen";

const ada = create(MemberSchema, { userId: "ada", email: "ada@example.com", roles: ["admin"], joinedAt: timestampFromDate(new Date(0)) });
const bob = create(MemberSchema, { userId: "bob", email: "bob@example.com", roles: ["member"] });

function invitation(id: string, email: string, sends = 1): Invitation {
  return create(InvitationSchema, {
    invitationId: id,
    orgId: "acme",
    email,
    role: "operator",
    invitedBy: "ada",
    state: InvitationState.PENDING,
    expiresAt: timestampFromDate(new Date(Date.now() + 7 * 86_400_000)),
    sends,
  });
}

function event(id: string, action: string, target: string, details: Record<string, string> = {}): AuditEvent {
  return create(AuditEventSchema, { eventId: id, action, actor: "ada", target, details, time: timestampFromDate(new Date(0)) });
}

/** OrganizationService as a fake: the three lists from arrays the test changes, every other RPC
 * as the test says. */
function organizations(
  state: { members: Member[]; invitations: Invitation[]; events: AuditEvent[] },
  rpcs: Partial<ServiceImpl<typeof OrganizationService>> = {},
) {
  const calls = { listAuditEvents: 0 };
  const transport = createRouterTransport((router) => {
    router.service(OrganizationService, {
      listMembers: () => ({ members: state.members }),
      listInvitations: (request) => {
        expect(request.pendingOnly).toBe(true);
        return { invitations: state.invitations };
      },
      listAuditEvents: () => {
        calls.listAuditEvents += 1;
        return { events: state.events };
      },
      ...rpcs,
    });
  });
  return { api: createApi(transport), calls };
}

describe("MembersScreen helpers", () => {
  it("shows a member's strongest role and validates an email before any call", () => {
    expect(primaryRole(["member", "admin"])).toBe("admin");
    expect(primaryRole(["operator"])).toBe("operator");
    expect(primaryRole([])).toBe("member");
    expect(emailProblem("")).toMatch(/Enter the email/);
    expect(emailProblem("not an address")).toMatch(/like name@example.com/);
    expect(emailProblem("eve@example.com")).toBe("");
    expect(describeAction("member.role_changed")).toBe("Role changed");
    expect(describeAction("something.new")).toBe("something.new");
  });
});

describe("MembersScreen", () => {
  it("lists members with roles, pending invitations and the audit log", async () => {
    const { api } = organizations({
      members: [ada, bob],
      invitations: [invitation("i1", "carol@example.com", 2)],
      events: [event("e1", "member.role_changed", "bob", { role: "member", previous_roles: "operator" })],
    });
    render(<MembersScreen api={api} me="ada" onError={vi.fn()} />);
    const rows = await screen.findAllByTestId("member-row");
    expect(rows).toHaveLength(2);
    expect(within(rows[0]!).getByText("(you)")).toBeTruthy();
    expect(screen.getByLabelText<HTMLSelectElement>("Role of ada@example.com").value).toBe("admin");
    expect(screen.getByLabelText<HTMLSelectElement>("Role of bob@example.com").value).toBe("member");
    const invited = await screen.findByTestId("invitation-row");
    expect(within(invited).getByText("carol@example.com")).toBeTruthy();
    expect(within(invited).getByText("sent 2 times")).toBeTruthy();
    const audited = await screen.findByTestId("audit-row");
    expect(within(audited).getByText("Role changed")).toBeTruthy();
    expect(within(audited).getByText("role: member, previous roles: operator")).toBeTruthy();
  });

  it("invites after checking the address; the invitation and its audit event appear", async () => {
    const state = { members: [ada], invitations: [] as Invitation[], events: [] as AuditEvent[] };
    const inviteMember = vi.fn((request: { email: string; role: string }) => {
      const sent = invitation("i2", request.email);
      sent.role = request.role;
      state.events = [event("e2", "invitation.sent", request.email)];
      return { invitation: sent };
    });
    const { api } = organizations(state, { inviteMember });
    render(<MembersScreen api={api} me="ada" onError={vi.fn()} />);
    await screen.findByText("No pending invitations.");
    const user = userEvent.setup();

    await user.click(screen.getByRole("button", { name: "Invite" }));
    expect(screen.getByRole("alert").textContent).toMatch(/Enter the email address/);
    expect(screen.getByLabelText("Email").getAttribute("aria-invalid")).toBe("true");
    expect(document.activeElement).toBe(screen.getByLabelText("Email"));
    await user.type(screen.getByLabelText("Email"), "not-an-address");
    await user.click(screen.getByRole("button", { name: "Invite" }));
    expect(screen.getByRole("alert").textContent).toMatch(/like name@example.com/);
    expect(inviteMember).not.toHaveBeenCalled();

    await user.clear(screen.getByLabelText("Email"));
    await user.type(screen.getByLabelText("Email"), "  dan@example.com ");
    await user.selectOptions(screen.getByLabelText("Role"), "operator");
    await user.click(screen.getByRole("button", { name: "Invite" }));
    const row = await screen.findByTestId("invitation-row");
    expect(within(row).getByText("dan@example.com")).toBeTruthy();
    expect(within(row).getByText("operator")).toBeTruthy();
    expect(inviteMember).toHaveBeenCalledTimes(1);
    expect(inviteMember.mock.calls[0]![0]).toMatchObject({ email: "dan@example.com", role: "operator" });
    expect(screen.getByRole("status").textContent).toBe("Invitation sent to dan@example.com.");
    expect(screen.getByLabelText<HTMLInputElement>("Email").value).toBe("");
    expect(screen.queryByRole("alert")).toBeNull();
    expect(within(await screen.findByTestId("audit-row")).getByText("Invitation sent")).toBeTruthy();
  });

  it("shows the service's refusals next to the form: a field violation on the field, the rest as a notice", async () => {
    const answers = [
      new ConnectError("invalid", Code.InvalidArgument, undefined, [
        { desc: BadRequestSchema, value: create(BadRequestSchema, { fieldViolations: [{ field: "email", description: "must be an email address" }] }) },
      ]),
      new ConnectError("only the organization's admins may invite", Code.PermissionDenied),
      new ConnectError("eve@example.com has a pending invitation", Code.AlreadyExists),
    ];
    const { api } = organizations(
      { members: [ada], invitations: [], events: [] },
      {
        inviteMember: () => {
          throw answers.shift();
        },
      },
    );
    const onError = vi.fn();
    render(<MembersScreen api={api} me="ada" onError={onError} />);
    await screen.findAllByTestId("member-row");
    const user = userEvent.setup();
    await user.type(screen.getByLabelText("Email"), "eve@example.com");

    await user.click(screen.getByRole("button", { name: "Invite" }));
    await waitFor(() => expect(screen.getByRole("alert").textContent).toBe("must be an email address"));
    expect(screen.getByLabelText("Email").getAttribute("aria-describedby")).toBe("invite-email-error");

    await user.click(screen.getByRole("button", { name: "Invite" }));
    await waitFor(() => expect(screen.getByRole("alert").textContent).toMatch(/Not allowed\..*only the organization's admins may invite/));

    await user.click(screen.getByRole("button", { name: "Invite" }));
    await waitFor(() => expect(screen.getByRole("alert").textContent).toMatch(/Already there\..*pending invitation/));
    expect(onError).not.toHaveBeenCalled();
    expect(screen.queryByTestId("invitation-row")).toBeNull();
  });

  it("changes a role only on the button, and says why the last admin cannot be demoted", async () => {
    const changeMemberRole = vi.fn((request: { userId: string; role: string }) => {
      if (request.userId === "ada") {
        throw new ConnectError("the organization must keep at least one admin", Code.FailedPrecondition);
      }
      return { member: create(MemberSchema, { ...bob, roles: [request.role] }) };
    });
    const { api, calls } = organizations({ members: [ada, bob], invitations: [], events: [] }, { changeMemberRole });
    render(<MembersScreen api={api} me="ada" onError={vi.fn()} />);
    await screen.findAllByTestId("member-row");
    const user = userEvent.setup();
    const changeBob = screen.getByRole<HTMLButtonElement>("button", { name: "Change role of bob@example.com" });
    expect(changeBob.disabled).toBe(true);

    await user.selectOptions(screen.getByLabelText("Role of bob@example.com"), "operator");
    expect(changeMemberRole).not.toHaveBeenCalled(); // choosing is not changing
    expect(changeBob.disabled).toBe(false);
    await user.click(changeBob);
    await waitFor(() => expect(screen.getByRole("status").textContent).toBe("bob@example.com is now operator."));
    expect(changeMemberRole.mock.calls[0]![0]).toMatchObject({ userId: "bob", role: "operator" });
    expect(screen.getByLabelText<HTMLSelectElement>("Role of bob@example.com").value).toBe("operator");
    await waitFor(() => expect(calls.listAuditEvents).toBe(2)); // the audit log shows the change

    await user.selectOptions(screen.getByLabelText("Role of ada@example.com"), "member");
    await user.click(screen.getByRole("button", { name: "Change role of ada@example.com" }));
    const alert = await screen.findByRole("alert");
    expect(alert.textContent).toMatch(/Not possible now\..*at least one admin/);
    expect(within(screen.getAllByTestId("member-row")[0]!).getByText("ada@example.com")).toBeTruthy();
  });

  it("removes a member only after confirmation", async () => {
    const removeMember = vi.fn(() => ({}));
    const { api } = organizations({ members: [ada, bob], invitations: [], events: [] }, { removeMember });
    render(<MembersScreen api={api} me="ada" onError={vi.fn()} />);
    await screen.findAllByTestId("member-row");
    const user = userEvent.setup();

    await user.click(screen.getByRole("button", { name: "Remove bob@example.com" }));
    expect(screen.getByText("Remove bob@example.com from the organization?")).toBeTruthy();
    expect(document.activeElement).toBe(screen.getByRole("button", { name: "Yes, remove" }));
    await user.click(screen.getByRole("button", { name: "Keep" }));
    expect(removeMember).not.toHaveBeenCalled();
    expect(screen.getAllByTestId("member-row")).toHaveLength(2);

    await user.click(screen.getByRole("button", { name: "Remove bob@example.com" }));
    await user.click(screen.getByRole("button", { name: "Yes, remove" }));
    await waitFor(() => expect(screen.getAllByTestId("member-row")).toHaveLength(1));
    expect(removeMember).toHaveBeenCalledTimes(1);
    expect(screen.getByRole("status").textContent).toBe("bob@example.com was removed from the organization.");
  });

  it("resends with one click at a time, and revokes", async () => {
    const held = deferred();
    const resendInvitation = vi.fn(async () => {
      await held.promise;
      return { invitation: invitation("i1", "carol@example.com", 2) };
    });
    const revokeInvitation = vi.fn((_request: { invitationId: string }) => ({ invitation: create(InvitationSchema, { invitationId: "i1", state: InvitationState.REVOKED }) }));
    const { api } = organizations(
      { members: [ada], invitations: [invitation("i1", "carol@example.com")], events: [] },
      { resendInvitation, revokeInvitation },
    );
    render(<MembersScreen api={api} me="ada" onError={vi.fn()} />);
    await screen.findByTestId("invitation-row");
    const user = userEvent.setup();
    const resend = screen.getByRole<HTMLButtonElement>("button", { name: "Resend invitation to carol@example.com" });
    await user.click(resend);
    expect(resend.disabled).toBe(true);
    await user.click(resend);
    held.resolve();
    await screen.findByText("sent 2 times");
    expect(resendInvitation).toHaveBeenCalledTimes(1);
    expect(screen.getByRole("status").textContent).toBe("Invitation sent again to carol@example.com.");

    await user.click(screen.getByRole("button", { name: "Revoke invitation to carol@example.com" }));
    await screen.findByText("No pending invitations.");
    expect(revokeInvitation.mock.calls[0]![0]).toMatchObject({ invitationId: "i1" });
  });

  it("hands an ended sign-in to the app, which offers signing in again", async () => {
    const { api } = organizations({ members: [], invitations: [], events: [] }, {
      listMembers: () => {
        throw new ConnectError("token revoked", Code.Unauthenticated);
      },
    });
    const onError = vi.fn();
    render(<MembersScreen api={api} me="ada" onError={onError} />);
    await waitFor(() => expect(onError).toHaveBeenCalledTimes(1));
    expect(ConnectError.from(onError.mock.calls[0]![0]).code).toBe(Code.Unauthenticated);
    expect(screen.queryByRole("alert")).toBeNull();
  });
});
