import { useEffect, useState, type FormEvent } from "react";
import type { Organization } from "@gen/opsmesh/identity/v1/organization_pb.js";
import type { Api } from "../api/transport";
import type { AuthClient } from "../auth/auth";
import type { Identity } from "../auth/claims";

/** More pages than anyone belongs to organizations: a bound, not a limit anyone meets. */
const MAX_PAGES = 10;

/** Every organization the signed-in user belongs to (ListMyOrganizations, all pages). */
export async function myOrganizations(api: Api, signal?: AbortSignal): Promise<Organization[]> {
  const found: Organization[] = [];
  let pageToken = "";
  for (let page = 0; page < MAX_PAGES; page += 1) {
    const reply = await api.organizations.listMyOrganizations({ pageSize: 200, pageToken }, { signal });
    found.push(...reply.organizations);
    pageToken = reply.nextPageToken;
    if (!pageToken) break;
  }
  return found;
}

function label(organization: Organization): string {
  const name = organization.name || organization.orgId;
  return organization.roles.length ? `${name} (${organization.roles.join(", ")})` : name;
}

/**
 * The header's organization switcher, shown only to users of more than one organization. A select
 * plus a button rather than switching on change: with the keyboard, arrowing through a closed
 * select changes its value, and each change would switch (WCAG 3.2.2, no change of context on
 * input). Switching exchanges the refresh token for the chosen organization's tokens (no
 * password); the app then mounts the current screen anew for that organization.
 */
export function OrganizationSwitcher({
  api,
  auth,
  identity,
  onError,
}: {
  api: Api;
  auth: Pick<AuthClient, "switchOrganization">;
  identity: Identity;
  onError: (error: unknown) => void;
}) {
  const [organizations, setOrganizations] = useState<Organization[]>([]);
  const [choice, setChoice] = useState(identity.orgId);
  const [switching, setSwitching] = useState(false);

  useEffect(() => {
    setChoice(identity.orgId);
    const controller = new AbortController();
    myOrganizations(api, controller.signal)
      .then(setOrganizations)
      .catch((error: unknown) => {
        if (!controller.signal.aborted) onError(error);
      });
    return () => controller.abort();
  }, [api, onError, identity.subject, identity.orgId]);

  if (organizations.length < 2) return null;

  const switchTo = async (event: FormEvent) => {
    event.preventDefault();
    if (choice === identity.orgId) return;
    setSwitching(true);
    try {
      await auth.switchOrganization(choice);
    } catch (error) {
      setChoice(identity.orgId);
      onError(error);
    } finally {
      setSwitching(false);
    }
  };

  return (
    <form className="org-switcher" onSubmit={(e) => void switchTo(e)} aria-busy={switching}>
      <label htmlFor="organization">Organization</label>
      <select id="organization" value={choice} onChange={(e) => setChoice(e.target.value)} disabled={switching}>
        {organizations.map((organization) => (
          <option key={organization.orgId} value={organization.orgId}>
            {label(organization)}
          </option>
        ))}
      </select>
      <button type="submit" disabled={switching || choice === identity.orgId}>
        Switch
      </button>
    </form>
  );
}
