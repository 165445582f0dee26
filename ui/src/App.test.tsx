import { create } from "@bufbuild/protobuf";
import { createRouterTransport } from "@connectrpc/connect";
import { render, screen, waitFor, within } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { afterEach, describe, expect, it, vi } from "vitest";
import { OrganizationSchema, OrganizationService } from "@gen/opsmesh/identity/v1/organization_pb.js";
import { TaskSchema, TaskService, TaskStatus, TaskType } from "@gen/opsmesh/task/v1/task_pb.js";
import { bearerInterceptor, createApi } from "./api/transport";
import { App } from "./App";
import { AuthClient } from "./auth/auth";
import { identityOf } from "./auth/claims";

const ISSUER = "http://localhost:8080";

function b64url(value: object | string): string {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** An access token of ada in `org`, where she is admin of acme only. */
function accessToken(org: string): string {
  const claims = {
    sub: "ada",
    org_id: org,
    roles: org === "acme" ? ["admin"] : ["member"],
    exp: Math.floor(Date.now() / 1000) + 900,
    iss: ISSUER,
    aud: "opsmesh",
  };
  return `${b64url({ alg: "ES256", kid: "k1", typ: "JWT" })}.${b64url(claims)}.${b64url("sig")}`;
}

/** The authorization server's token endpoint as the browser sees it: a refresh grant answers with
 * tokens for the org_id it names (or the same org). */
function tokenEndpoint() {
  const grants: URLSearchParams[] = [];
  const fetch = vi.fn(async (input: RequestInfo | URL, init?: RequestInit) => {
    const url = new URL(input instanceof Request ? input.url : String(input));
    const json = (body: object) => new Response(JSON.stringify(body), { headers: { "content-type": "application/json" } });
    if (url.pathname === "/.well-known/openid-configuration") {
      return json({ issuer: ISSUER, authorization_endpoint: `${ISSUER}/oauth/authorize`, token_endpoint: `${ISSUER}/oauth/token` });
    }
    const form = new URLSearchParams(String(init?.body ?? ""));
    grants.push(form);
    const org = form.get("org_id") ?? "acme";
    return json({ access_token: accessToken(org), token_type: "Bearer", refresh_token: `rt-${org}` });
  });
  return { fetch: fetch as unknown as typeof globalThis.fetch, grants };
}

afterEach(() => window.history.replaceState(null, "", "/"));

describe("App", () => {
  it("switching organization reloads the open screen with the new org's token and its roles", async () => {
    window.history.replaceState(null, "", "/tasks");
    window.sessionStorage.setItem("opsmesh.auth.refresh", "rt-acme");
    const server = tokenEndpoint();
    const auth = new AuthClient({
      issuer: ISSUER,
      clientId: "opsmesh-web",
      redirectUri: `${ISSUER}/oauth/callback`,
      storage: window.sessionStorage,
      fetch: server.fetch,
    });
    const orgOf = (header: Headers) => identityOf((header.get("authorization") ?? "").replace(/^Bearer /, "")).orgId;
    const listedFor: string[] = [];
    const transport = createRouterTransport(
      (router) => {
        router.service(TaskService, {
          listTasks: (_request, context) => {
            const org = orgOf(context.requestHeader);
            listedFor.push(org);
            const task = create(TaskSchema, {
              id: org,
              type: TaskType.WORKSPACE,
              status: TaskStatus.SUCCEEDED,
              typedPayload: { case: "workspace", value: { workspace: `${org}-space` } },
            });
            return { tasks: [task] };
          },
        });
        router.service(OrganizationService, {
          listMyOrganizations: (_request, context) => {
            const current = orgOf(context.requestHeader);
            return {
              organizations: [
                create(OrganizationSchema, { orgId: "acme", name: "Acme", roles: ["admin"], current: current === "acme" }),
                create(OrganizationSchema, { orgId: "globex", name: "Globex", roles: ["member"], current: current === "globex" }),
              ],
            };
          },
        });
      },
      { transport: { interceptors: [bearerInterceptor(auth)] } },
    );

    render(<App auth={auth} api={createApi(transport)} />);
    const row = await screen.findByTestId("task-row");
    expect(within(row).getByText(/acme-space/)).toBeTruthy();
    expect(screen.getByRole("button", { name: "Members" })).toBeTruthy(); // admin of acme

    const user = userEvent.setup();
    await user.selectOptions(await screen.findByLabelText("Organization"), "globex");
    await user.click(screen.getByRole("button", { name: "Switch" }));

    await waitFor(() => expect(screen.getByTestId("identity").textContent).toBe("ada · globex"));
    expect(within(await screen.findByTestId("task-row")).getByText(/globex-space/)).toBeTruthy();
    expect(screen.queryByText(/acme-space/)).toBeNull();
    expect(listedFor).toEqual(["acme", "globex"]);
    expect(screen.queryByRole("button", { name: "Members" })).toBeNull(); // a member of globex
    expect(server.grants.map((g) => g.get("org_id"))).toEqual([null, "globex"]);
    expect(window.sessionStorage.getItem("opsmesh.auth.refresh")).toBe("rt-globex");
  });
});
