import { useCallback, useEffect, useRef, useState, type FormEvent } from "react";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { AuditEvent, Invitation, Member } from "@gen/opsmesh/identity/v1/organization_pb.js";
import { describeError, fieldViolations, type Problem } from "../api/errors";
import type { Api } from "../api/transport";
import { ProblemNotice } from "./ProblemNotice";

/** The roles OrganizationService grants, strongest first (proto/opsmesh/identity/v1/organization.proto). */
export const ROLES = ["admin", "operator", "member"] as const;
type Role = (typeof ROLES)[number];

const PAGE_SIZE = 50;

/** The role a member's select shows: their strongest known role. */
export function primaryRole(roles: readonly string[]): Role {
  return ROLES.find((role) => roles.includes(role)) ?? "member";
}

/** A plausible address; the service decides (INVALID_ARGUMENT names the field if it disagrees). */
export function emailProblem(email: string): string {
  if (!email) return "Enter the email address of the person to invite.";
  if (!/^[^\s@]+@[^\s@]+\.[^\s@]+$/.test(email)) return "Enter an email address like name@example.com.";
  return "";
}

const ACTIONS: Record<string, string> = {
  "invitation.sent": "Invitation sent",
  "invitation.resent": "Invitation sent again",
  "invitation.revoked": "Invitation revoked",
  "invitation.accepted": "Invitation accepted",
  "member.role_changed": "Role changed",
  "member.removed": "Member removed",
  "password.reset": "Password reset",
};

export function describeAction(action: string): string {
  return ACTIONS[action] ?? action;
}

function when(timestamp: Timestamp | undefined): string {
  return timestamp ? timestampDate(timestamp).toLocaleString() : "—";
}

type Section = "invite" | "members" | "invitations" | "audit";

/** One paged list: the items so far and the token of the next page. */
function usePagedList<T>(
  fetchPage: (pageToken: string) => Promise<{ items: T[]; next: string }>,
  fail: (error: unknown) => void,
) {
  const [items, setItems] = useState<T[]>([]);
  const [next, setNext] = useState("");
  const [loaded, setLoaded] = useState(false);
  const load = useCallback(
    async (pageToken: string) => {
      try {
        const page = await fetchPage(pageToken);
        setItems((known) => (pageToken ? [...known, ...page.items] : page.items));
        setNext(page.next);
        setLoaded(true);
      } catch (error) {
        fail(error);
      }
    },
    [fetchPage, fail],
  );
  return { items, setItems, next, loaded, load };
}

/**
 * An organization's members, roles, pending invitations and audit log, for its admins (the app
 * shows the screen to admins only; the service refuses everyone else with PERMISSION_DENIED, which
 * this screen then shows). Each section shows its own errors next to what failed; an ended sign-in
 * goes to the app, which offers signing in again.
 */
export function MembersScreen({ api, me, onError }: { api: Api; me: string; onError: (error: unknown) => void }) {
  const [problems, setProblems] = useState<Partial<Record<Section, Problem>>>({});
  const [status, setStatus] = useState("");
  const [email, setEmail] = useState("");
  const [role, setRole] = useState<Role>("member");
  const [emailError, setEmailError] = useState("");
  const [inviting, setInviting] = useState(false);
  const [busy, setBusy] = useState<ReadonlySet<string>>(new Set());
  const [roleDrafts, setRoleDrafts] = useState<Record<string, Role>>({});
  const [confirmingRemoval, setConfirmingRemoval] = useState("");
  const confirmButton = useRef<HTMLButtonElement>(null);
  const emailInput = useRef<HTMLInputElement>(null);

  const failIn = useCallback(
    (section: Section) => (error: unknown) => {
      const problem = describeError(error);
      if (problem.cancelled) return;
      if (problem.signIn) onError(error);
      else setProblems((known) => ({ ...known, [section]: problem }));
    },
    [onError],
  );
  const clearProblem = (section: Section) =>
    setProblems(({ [section]: _gone, ...rest }) => rest);

  const failMembers = useCallback((error: unknown) => failIn("members")(error), [failIn]);
  const failInvitations = useCallback((error: unknown) => failIn("invitations")(error), [failIn]);
  const failAudit = useCallback((error: unknown) => failIn("audit")(error), [failIn]);

  const members = usePagedList<Member>(
    useCallback(
      async (pageToken) => {
        const reply = await api.organizations.listMembers({ pageSize: PAGE_SIZE, pageToken });
        return { items: reply.members, next: reply.nextPageToken };
      },
      [api],
    ),
    failMembers,
  );
  const invitations = usePagedList<Invitation>(
    useCallback(
      async (pageToken) => {
        const reply = await api.organizations.listInvitations({ pageSize: PAGE_SIZE, pageToken, pendingOnly: true });
        return { items: reply.invitations, next: reply.nextPageToken };
      },
      [api],
    ),
    failInvitations,
  );
  const audit = usePagedList<AuditEvent>(
    useCallback(
      async (pageToken) => {
        const reply = await api.organizations.listAuditEvents({ pageSize: PAGE_SIZE, pageToken });
        return { items: reply.events, next: reply.nextPageToken };
      },
      [api],
    ),
    failAudit,
  );
  const { load: loadMembers } = members;
  const { load: loadInvitations } = invitations;
  const { load: loadAudit } = audit;

  useEffect(() => {
    void loadMembers("");
    void loadInvitations("");
    void loadAudit("");
  }, [loadMembers, loadInvitations, loadAudit]);

  useEffect(() => {
    if (confirmingRemoval) confirmButton.current?.focus();
  }, [confirmingRemoval]);

  /** Runs one change, at most once at a time per key; the audit log then shows it. */
  const change = async (key: string, section: Section, run: () => Promise<string>) => {
    if (busy.has(key)) return;
    setBusy((known) => new Set(known).add(key));
    clearProblem(section);
    try {
      setStatus(await run());
      void loadAudit("");
    } catch (error) {
      failIn(section)(error);
    } finally {
      setBusy((known) => {
        const left = new Set(known);
        left.delete(key);
        return left;
      });
    }
  };

  const invite = async (event: FormEvent) => {
    event.preventDefault();
    const address = email.trim();
    const invalid = emailProblem(address);
    setEmailError(invalid);
    if (invalid) {
      emailInput.current?.focus();
      return;
    }
    setInviting(true);
    clearProblem("invite");
    try {
      const { invitation } = await api.organizations.inviteMember({ email: address, role });
      if (invitation) invitations.setItems((known) => [invitation, ...known.filter((i) => i.invitationId !== invitation.invitationId)]);
      setEmail("");
      setStatus(`Invitation sent to ${address}.`);
      void loadAudit("");
    } catch (error) {
      const onEmail = fieldViolations(error).email;
      if (onEmail) {
        setEmailError(onEmail);
        emailInput.current?.focus();
      } else {
        failIn("invite")(error);
      }
    } finally {
      setInviting(false);
    }
  };

  const replaceInvitation = (updated: Invitation | undefined) => {
    if (!updated) return;
    invitations.setItems((known) => known.map((i) => (i.invitationId === updated.invitationId ? updated : i)));
  };

  const resend = (invitation: Invitation) =>
    change(`resend:${invitation.invitationId}`, "invitations", async () => {
      const reply = await api.organizations.resendInvitation({ invitationId: invitation.invitationId });
      replaceInvitation(reply.invitation);
      return `Invitation sent again to ${invitation.email}.`;
    });

  const revoke = (invitation: Invitation) =>
    change(`revoke:${invitation.invitationId}`, "invitations", async () => {
      await api.organizations.revokeInvitation({ invitationId: invitation.invitationId });
      invitations.setItems((known) => known.filter((i) => i.invitationId !== invitation.invitationId));
      return `Invitation for ${invitation.email} revoked.`;
    });

  const changeRole = (member: Member, next: Role) =>
    change(`role:${member.userId}`, "members", async () => {
      const reply = await api.organizations.changeMemberRole({ userId: member.userId, role: next });
      const updated = reply.member;
      if (updated) members.setItems((known) => known.map((m) => (m.userId === updated.userId ? updated : m)));
      setRoleDrafts(({ [member.userId]: _done, ...rest }) => rest);
      return `${member.email || member.userId} is now ${next}.`;
    });

  const remove = (member: Member) =>
    change(`remove:${member.userId}`, "members", async () => {
      try {
        await api.organizations.removeMember({ userId: member.userId });
      } finally {
        setConfirmingRemoval("");
      }
      members.setItems((known) => known.filter((m) => m.userId !== member.userId));
      return `${member.email || member.userId} was removed from the organization.`;
    });

  const problemIn = (section: Section) => {
    const problem = problems[section];
    return problem ? <ProblemNotice problem={problem} onDismiss={() => clearProblem(section)} /> : null;
  };

  return (
    <section className="members" aria-label="Members">
      <h1>Members</h1>
      <p role="status" className="muted" data-testid="members-status">
        {status}
      </p>

      <section aria-labelledby="invite-heading">
        <h2 id="invite-heading">Invite a member</h2>
        <form className="inline-form" noValidate onSubmit={(e) => void invite(e)}>
          <label htmlFor="invite-email">Email</label>
          <input
            id="invite-email"
            ref={emailInput}
            type="email"
            autoComplete="off"
            value={email}
            placeholder="name@example.com"
            aria-invalid={emailError !== ""}
            aria-describedby={emailError ? "invite-email-error" : undefined}
            onChange={(e) => {
              setEmail(e.target.value);
              if (emailError) setEmailError("");
            }}
          />
          <label htmlFor="invite-role">Role</label>
          <select id="invite-role" value={role} onChange={(e) => setRole(e.target.value as Role)}>
            {ROLES.map((r) => (
              <option key={r} value={r}>
                {r}
              </option>
            ))}
          </select>
          <button type="submit" className="primary" disabled={inviting}>
            Invite
          </button>
        </form>
        {emailError ? (
          <p id="invite-email-error" className="field-error" role="alert">
            {emailError}
          </p>
        ) : null}
        {problemIn("invite")}
      </section>

      <section aria-labelledby="members-heading">
        <h2 id="members-heading">Current members</h2>
        {problemIn("members")}
        {members.loaded && members.items.length === 0 ? <p className="muted">No members.</p> : null}
        {members.items.length ? (
          <table aria-labelledby="members-heading">
            <thead>
              <tr>
                <th scope="col">Member</th>
                <th scope="col">Role</th>
                <th scope="col">Joined</th>
                <th scope="col">
                  <span className="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {members.items.map((member) => {
                const name = member.email || member.userId;
                const current = primaryRole(member.roles);
                const draft = roleDrafts[member.userId] ?? current;
                const roleId = `role-${member.userId}`;
                return (
                  <tr key={member.userId} data-testid="member-row">
                    <td>
                      {name}
                      {member.userId === me ? <span className="muted"> (you)</span> : null}
                      {member.email ? <div className="muted">{member.userId}</div> : null}
                    </td>
                    <td>
                      <label htmlFor={roleId} className="sr-only">
                        Role of {name}
                      </label>
                      <select
                        id={roleId}
                        value={draft}
                        onChange={(e) => setRoleDrafts((known) => ({ ...known, [member.userId]: e.target.value as Role }))}
                      >
                        {ROLES.map((r) => (
                          <option key={r} value={r}>
                            {r}
                          </option>
                        ))}
                      </select>{" "}
                      <button
                        type="button"
                        aria-label={`Change role of ${name}`}
                        disabled={draft === current || busy.has(`role:${member.userId}`)}
                        onClick={() => void changeRole(member, draft)}
                      >
                        Change role
                      </button>
                    </td>
                    <td>{when(member.joinedAt)}</td>
                    <td>
                      {confirmingRemoval === member.userId ? (
                        <span className="confirm">
                          <span>Remove {name} from the organization?</span>
                          <button
                            type="button"
                            className="danger"
                            ref={confirmButton}
                            disabled={busy.has(`remove:${member.userId}`)}
                            onClick={() => void remove(member)}
                          >
                            Yes, remove
                          </button>
                          <button type="button" onClick={() => setConfirmingRemoval("")}>
                            Keep
                          </button>
                        </span>
                      ) : (
                        <button type="button" aria-label={`Remove ${name}`} onClick={() => setConfirmingRemoval(member.userId)}>
                          Remove
                        </button>
                      )}
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        ) : null}
        {members.next ? (
          <button type="button" className="link" onClick={() => void members.load(members.next)}>
            More members
          </button>
        ) : null}
      </section>

      <section aria-labelledby="invitations-heading">
        <h2 id="invitations-heading">Pending invitations</h2>
        {problemIn("invitations")}
        {invitations.loaded && invitations.items.length === 0 ? <p className="muted">No pending invitations.</p> : null}
        {invitations.items.length ? (
          <table aria-labelledby="invitations-heading">
            <thead>
              <tr>
                <th scope="col">Email</th>
                <th scope="col">Role</th>
                <th scope="col">Invited by</th>
                <th scope="col">Link expires</th>
                <th scope="col">
                  <span className="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {invitations.items.map((invitation) => (
                <tr key={invitation.invitationId} data-testid="invitation-row">
                  <td>{invitation.email}</td>
                  <td>{invitation.role}</td>
                  <td>{invitation.invitedBy}</td>
                  <td>
                    {when(invitation.expiresAt)}
                    {invitation.sends > 1 ? <div className="muted">sent {invitation.sends} times</div> : null}
                  </td>
                  <td className="actions">
                    <button
                      type="button"
                      aria-label={`Resend invitation to ${invitation.email}`}
                      disabled={busy.has(`resend:${invitation.invitationId}`)}
                      onClick={() => void resend(invitation)}
                    >
                      Resend
                    </button>
                    <button
                      type="button"
                      aria-label={`Revoke invitation to ${invitation.email}`}
                      disabled={busy.has(`revoke:${invitation.invitationId}`)}
                      onClick={() => void revoke(invitation)}
                    >
                      Revoke
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        ) : null}
        {invitations.next ? (
          <button type="button" className="link" onClick={() => void invitations.load(invitations.next)}>
            More invitations
          </button>
        ) : null}
      </section>

      <section aria-labelledby="audit-heading">
        <h2 id="audit-heading">Audit log</h2>
        {problemIn("audit")}
        {audit.loaded && audit.items.length === 0 ? <p className="muted">No changes recorded yet.</p> : null}
        {audit.items.length ? (
          <table aria-labelledby="audit-heading">
            <thead>
              <tr>
                <th scope="col">When</th>
                <th scope="col">Who</th>
                <th scope="col">What</th>
                <th scope="col">Target</th>
                <th scope="col">Details</th>
              </tr>
            </thead>
            <tbody>
              {audit.items.map((event) => (
                <tr key={event.eventId} data-testid="audit-row">
                  <td>{when(event.time)}</td>
                  <td>{event.actor}</td>
                  <td>{describeAction(event.action)}</td>
                  <td>{event.target}</td>
                  <td>
                    {Object.entries(event.details)
                      .map(([key, value]) => `${key.replace(/_/g, " ")}: ${value}`)
                      .join(", ")}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        ) : null}
        {audit.next ? (
          <button type="button" className="link" onClick={() => void audit.load(audit.next)}>
            More events
          </button>
        ) : null}
      </section>
    </section>
  );
}
