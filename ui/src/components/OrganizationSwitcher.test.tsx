import { create } from "@bufbuild/protobuf";
import { createRouterTransport } from "@connectrpc/connect";
import { render, screen, waitFor } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { describe, expect, it, vi } from "vitest";
import { OrganizationSchema, OrganizationService, type Organization } from "@gen/opsmesh/identity/v1/organization_pb.js";
import { createApi } from "../api/transport";
import { OrganizationSwitchRefused } from "../auth/auth";
import type { Identity } from "../auth/claims";
import { myOrganizations, OrganizationSwitcher } from "./OrganizationSwitcher";

const acme = create(OrganizationSchema, { orgId: "acme", name: "Acme", roles: ["admin"], current: true });
const globex = create(OrganizationSchema, { orgId: "globex", name: "Globex", roles: ["member"] });
const identity: Identity = { subject: "ada", orgId: "acme", roles: ["admin"], expiresAt: Date.now() + 900_000 };

function api(organizations: Organization[]) {
  return createApi(
    createRouterTransport((router) => {
      router.service(OrganizationService, { listMyOrganizations: () => ({ organizations }) });
    }),
  );
}

describe("myOrganizations", () => {
  it("reads every page", async () => {
    const transport = createRouterTransport((router) => {
      router.service(OrganizationService, {
        listMyOrganizations: (request) =>
          request.pageToken ? { organizations: [globex] } : { organizations: [acme], nextPageToken: "p2" },
      });
    });
    expect((await myOrganizations(createApi(transport))).map((o) => o.orgId)).toEqual(["acme", "globex"]);
  });
});

describe("OrganizationSwitcher", () => {
  it("is not there for a user of one organization", async () => {
    const listed = vi.fn(() => ({ organizations: [acme] }));
    const single = createApi(
      createRouterTransport((router) => router.service(OrganizationService, { listMyOrganizations: listed })),
    );
    render(<OrganizationSwitcher api={single} auth={{ switchOrganization: vi.fn() }} identity={identity} onError={vi.fn()} />);
    await waitFor(() => expect(listed).toHaveBeenCalled());
    expect(screen.queryByLabelText("Organization")).toBeNull();
  });

  it("switches to the chosen organization on the button, not on choosing", async () => {
    const switchOrganization = vi.fn(async () => {});
    render(
      <OrganizationSwitcher api={api([acme, globex])} auth={{ switchOrganization }} identity={identity} onError={vi.fn()} />,
    );
    const select = await screen.findByLabelText<HTMLSelectElement>("Organization");
    expect([...select.options].map((o) => o.text)).toEqual(["Acme (admin)", "Globex (member)"]);
    expect(select.value).toBe("acme");
    const button = screen.getByRole<HTMLButtonElement>("button", { name: "Switch" });
    expect(button.disabled).toBe(true);

    const user = userEvent.setup();
    await user.selectOptions(select, "globex");
    expect(switchOrganization).not.toHaveBeenCalled();
    await user.click(button);
    expect(switchOrganization).toHaveBeenCalledWith("globex");
  });

  it("a refused switch is reported and the current organization stays selected", async () => {
    const refused = new OrganizationSwitchRefused("not a member of globex");
    const onError = vi.fn();
    render(
      <OrganizationSwitcher
        api={api([acme, globex])}
        auth={{ switchOrganization: vi.fn(async () => Promise.reject(refused)) }}
        identity={identity}
        onError={onError}
      />,
    );
    const user = userEvent.setup();
    await user.selectOptions(await screen.findByLabelText("Organization"), "globex");
    await user.click(screen.getByRole("button", { name: "Switch" }));
    await waitFor(() => expect(onError).toHaveBeenCalledWith(refused));
    expect(screen.getByLabelText<HTMLSelectElement>("Organization").value).toBe("acme");
  });
});
