// @vitest-environment node
import { describe, expect, it, vi } from "vitest";
import { AuthClient, OrganizationSwitchRefused, SignInRequired } from "./auth";

const ISSUER = "http://localhost:8080";
const REDIRECT = "http://localhost:8080/oauth/callback";

function b64url(value: object | string): string {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function jwt(claims: object): string {
  return `${b64url({ alg: "ES256", kid: "k1", typ: "JWT" })}.${b64url(claims)}.${b64url("sig")}`;
}

function accessToken(exp: number, orgId = "acme", roles = ["admin"]): string {
  return jwt({ sub: "ada", org_id: orgId, roles, exp, iss: ISSUER, aud: "opsmesh" });
}

class MemoryStorage implements Storage {
  private items = new Map<string, string>();
  get length() {
    return this.items.size;
  }
  clear() {
    this.items.clear();
  }
  getItem(key: string) {
    return this.items.get(key) ?? null;
  }
  key(index: number) {
    return [...this.items.keys()][index] ?? null;
  }
  removeItem(key: string) {
    this.items.delete(key);
  }
  setItem(key: string, value: string) {
    this.items.set(key, value);
  }
}

/** An authorization server at the HTTP level, as oauth4webapi sees it. */
function fakeServer(tokenReply: (form: URLSearchParams) => { status: number; body: object }) {
  const tokenCalls: URLSearchParams[] = [];
  const revoked: string[] = [];
  const fetch = vi.fn(async (input: RequestInfo | URL, init?: RequestInit) => {
    const url = new URL(input instanceof Request ? input.url : String(input));
    const json = (status: number, body: object) =>
      new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });
    if (url.pathname === "/.well-known/openid-configuration") {
      return json(200, {
        issuer: ISSUER,
        authorization_endpoint: `${ISSUER}/oauth/authorize`,
        token_endpoint: `${ISSUER}/oauth/token`,
        revocation_endpoint: `${ISSUER}/oauth/revoke`,
        id_token_signing_alg_values_supported: ["ES256"],
      });
    }
    const form = new URLSearchParams(String(init?.body ?? ""));
    if (url.pathname === "/oauth/token") {
      tokenCalls.push(form);
      await new Promise((resolve) => setTimeout(resolve, 5));
      const reply = tokenReply(form);
      return json(reply.status, reply.body);
    }
    if (url.pathname === "/oauth/revoke") {
      revoked.push(form.get("token") ?? "");
      return new Response(null, { status: 200 });
    }
    return json(404, {});
  });
  return { fetch: fetch as unknown as typeof globalThis.fetch, tokenCalls, revoked };
}

function client(storage: Storage, fetch: typeof globalThis.fetch, now = () => Date.now()) {
  return new AuthClient({ issuer: ISSUER, clientId: "opsmesh-web", redirectUri: REDIRECT, storage, fetch, now });
}

describe("AuthClient", () => {
  it("signs in with PKCE S256, checking state and the ID token's nonce", async () => {
    const storage = new MemoryStorage();
    let nonceSeen = "";
    const server = fakeServer((form) => {
      expect(form.get("grant_type")).toBe("authorization_code");
      expect(form.get("code_verifier")?.length).toBeGreaterThanOrEqual(43);
      const now = Math.floor(Date.now() / 1000);
      return {
        status: 200,
        body: {
          access_token: accessToken(now + 900),
          token_type: "Bearer",
          expires_in: 900,
          refresh_token: "rt-1",
          id_token: jwt({ iss: ISSUER, aud: "opsmesh-web", sub: "ada", iat: now, exp: now + 900, nonce: nonceSeen }),
        },
      };
    });
    const auth = client(storage, server.fetch);
    const url = await auth.beginSignIn("/tasks");
    expect(url.searchParams.get("code_challenge_method")).toBe("S256");
    expect(url.searchParams.get("scope")).toBe("openid offline_access");
    const state = url.searchParams.get("state") ?? "";
    nonceSeen = url.searchParams.get("nonce") ?? "";
    expect(nonceSeen).not.toBe("");

    const back = await auth.completeSignIn(new URL(`${REDIRECT}?code=c&state=${state}&iss=${encodeURIComponent(ISSUER)}`));
    expect(back).toBe("/tasks");
    expect(auth.identity?.subject).toBe("ada");
    expect(auth.identity?.roles).toEqual(["admin"]);
    expect(storage.getItem("opsmesh.auth.refresh")).toBe("rt-1");
  });

  it("refuses a callback with another state, and an ID token with another nonce", async () => {
    const now = Math.floor(Date.now() / 1000);
    const server = fakeServer(() => ({
      status: 200,
      body: {
        access_token: accessToken(now + 900),
        token_type: "Bearer",
        refresh_token: "rt",
        id_token: jwt({ iss: ISSUER, aud: "opsmesh-web", sub: "ada", iat: now, exp: now + 900, nonce: "forged" }),
      },
    }));
    const auth = client(new MemoryStorage(), server.fetch);
    await auth.beginSignIn();
    await expect(auth.completeSignIn(new URL(`${REDIRECT}?code=c&state=attacker&iss=${ISSUER}`))).rejects.toThrow();
    expect(server.tokenCalls).toHaveLength(0); // the code was never redeemed

    const url = await auth.beginSignIn();
    const state = url.searchParams.get("state") ?? "";
    await expect(auth.completeSignIn(new URL(`${REDIRECT}?code=c&state=${state}&iss=${ISSUER}`))).rejects.toThrow(/nonce/);
    expect(auth.identity).toBeNull();
    // The pending sign-in is spent: replaying the callback fails too.
    await expect(auth.completeSignIn(new URL(`${REDIRECT}?code=c&state=${state}&iss=${ISSUER}`))).rejects.toThrow(/No sign-in/);
  });

  it("parallel calls near expiry share one refresh (a single-use token is spent once)", async () => {
    const storage = new MemoryStorage();
    storage.setItem("opsmesh.auth.refresh", "rt-0");
    let issued = 0;
    const server = fakeServer((form) => {
      expect(form.get("refresh_token")).toBe(`rt-${issued}`);
      issued += 1;
      return {
        status: 200,
        body: { access_token: accessToken(Math.floor(Date.now() / 1000) + 900), token_type: "Bearer", refresh_token: `rt-${issued}` },
      };
    });
    const auth = client(storage, server.fetch);
    const tokens = await Promise.all(Array.from({ length: 8 }, () => auth.accessToken()));
    expect(new Set(tokens).size).toBe(1);
    expect(server.tokenCalls).toHaveLength(1);
    expect(storage.getItem("opsmesh.auth.refresh")).toBe("rt-1");
    await auth.accessToken(); // still fresh: no new exchange
    expect(server.tokenCalls).toHaveLength(1);
  });

  it("refreshes before expiry, within the skew", async () => {
    const storage = new MemoryStorage();
    storage.setItem("opsmesh.auth.refresh", "rt");
    let clock = Date.now();
    const server = fakeServer(() => ({
      status: 200,
      body: { access_token: accessToken(Math.floor(clock / 1000) + 120), token_type: "Bearer", refresh_token: "rt" },
    }));
    const auth = client(storage, server.fetch, () => clock);
    await auth.accessToken();
    clock += 30_000; // 90 s left > 60 s skew
    await auth.accessToken();
    expect(server.tokenCalls).toHaveLength(1);
    clock += 40_000; // 50 s left: refresh now
    await auth.accessToken();
    expect(server.tokenCalls).toHaveLength(2);
  });

  it("a refused refresh token signs out: tokens forgotten, SignInRequired", async () => {
    const storage = new MemoryStorage();
    storage.setItem("opsmesh.auth.refresh", "reused");
    const server = fakeServer(() => ({ status: 400, body: { error: "invalid_grant", error_description: "refresh token reused" } }));
    const auth = client(storage, server.fetch);
    await expect(auth.accessToken()).rejects.toBeInstanceOf(SignInRequired);
    expect(storage.getItem("opsmesh.auth.refresh")).toBeNull();
    expect(auth.canRestore).toBe(false);
  });

  it("sign out revokes the refresh token and forgets it", async () => {
    const storage = new MemoryStorage();
    storage.setItem("opsmesh.auth.refresh", "rt-9");
    const server = fakeServer(() => ({
      status: 200,
      body: { access_token: accessToken(Math.floor(Date.now() / 1000) + 900), token_type: "Bearer", refresh_token: "rt-10" },
    }));
    const auth = client(storage, server.fetch);
    const seen: (string | null)[] = [];
    auth.subscribe((identity) => seen.push(identity?.subject ?? null));
    await auth.refresh();
    await auth.signOut();
    expect(server.revoked).toEqual(["rt-10"]);
    expect(auth.identity).toBeNull();
    expect(storage.getItem("opsmesh.auth.refresh")).toBeNull();
    expect(seen).toEqual(["ada", null]);
  });

  it("switches organization with the refresh token, no password: the new token names the org", async () => {
    const storage = new MemoryStorage();
    storage.setItem("opsmesh.auth.refresh", "rt-acme");
    const exp = () => Math.floor(Date.now() / 1000) + 900;
    const server = fakeServer((form) => {
      const org = form.get("org_id");
      return {
        status: 200,
        body: {
          access_token: org ? accessToken(exp(), org, ["member"]) : accessToken(exp()),
          token_type: "Bearer",
          refresh_token: `rt-${org ?? "acme"}`,
        },
      };
    });
    const auth = client(storage, server.fetch);
    await auth.refresh();
    const seen: string[] = [];
    auth.subscribe((identity) => seen.push(identity?.orgId ?? ""));

    const switching = auth.switchOrganization("globex");
    const token = auth.accessToken(); // made during the switch: waits for it
    await switching;
    expect(auth.identity?.orgId).toBe("globex");
    expect(auth.identity?.roles).toEqual(["member"]);
    expect(JSON.parse(atob((await token).split(".")[1]!.replace(/-/g, "+").replace(/_/g, "/"))).org_id).toBe("globex");
    expect(server.tokenCalls).toHaveLength(2);
    expect(server.tokenCalls[1]!.get("grant_type")).toBe("refresh_token");
    expect(server.tokenCalls[1]!.get("refresh_token")).toBe("rt-acme");
    expect(server.tokenCalls[1]!.get("org_id")).toBe("globex");
    expect(server.tokenCalls[1]!.has("password")).toBe(false);
    expect(storage.getItem("opsmesh.auth.refresh")).toBe("rt-globex");
    expect(seen).toEqual(["globex"]);
  });

  it("a switch the server refuses for that org keeps the current sign-in", async () => {
    const storage = new MemoryStorage();
    storage.setItem("opsmesh.auth.refresh", "rt-1");
    const server = fakeServer((form) =>
      form.get("org_id")
        ? { status: 400, body: { error: "invalid_request", error_description: "not a member of globex" } }
        : { status: 200, body: { access_token: accessToken(Math.floor(Date.now() / 1000) + 900), token_type: "Bearer", refresh_token: "rt-1" } },
    );
    const auth = client(storage, server.fetch);
    await auth.refresh();
    const refused = auth.switchOrganization("globex");
    await expect(refused).rejects.toBeInstanceOf(OrganizationSwitchRefused);
    await expect(refused).rejects.toThrow("not a member of globex");
    expect(auth.identity?.orgId).toBe("acme");
    expect(storage.getItem("opsmesh.auth.refresh")).toBe("rt-1");
  });

  it("a switch with a dead refresh token ends the sign-in", async () => {
    const storage = new MemoryStorage();
    storage.setItem("opsmesh.auth.refresh", "revoked");
    const server = fakeServer(() => ({ status: 400, body: { error: "invalid_grant", error_description: "revoked" } }));
    const auth = client(storage, server.fetch);
    await expect(auth.switchOrganization("globex")).rejects.toBeInstanceOf(SignInRequired);
    expect(auth.canRestore).toBe(false);
  });

  it("tokens for another org than the one asked for are refused, not shown as that org", async () => {
    const storage = new MemoryStorage();
    storage.setItem("opsmesh.auth.refresh", "rt");
    const server = fakeServer(() => ({
      status: 200,
      body: { access_token: accessToken(Math.floor(Date.now() / 1000) + 900, "acme"), token_type: "Bearer", refresh_token: "rt-2" },
    }));
    const auth = client(storage, server.fetch);
    await expect(auth.switchOrganization("globex")).rejects.toBeInstanceOf(OrganizationSwitchRefused);
    expect(auth.identity?.orgId).toBe("acme");
    expect(storage.getItem("opsmesh.auth.refresh")).toBe("rt-2"); // the spent one is replaced
  });

  it("a switch asked for during a refresh waits for it, and calls meanwhile wait for the switch", async () => {
    const storage = new MemoryStorage();
    storage.setItem("opsmesh.auth.refresh", "rt-0");
    let issued = 0;
    const server = fakeServer((form) => {
      expect(form.get("refresh_token")).toBe(`rt-${issued}`); // each single-use token spent once
      issued += 1;
      const org = form.get("org_id") ?? "acme";
      return {
        status: 200,
        body: { access_token: accessToken(Math.floor(Date.now() / 1000) + 900, org), token_type: "Bearer", refresh_token: `rt-${issued}` },
      };
    });
    const auth = client(storage, server.fetch);
    const refreshing = auth.refresh();
    const switching = auth.switchOrganization("globex");
    await refreshing;
    const token = await auth.accessToken(); // after the refresh, before the switch has answered
    await switching;
    expect(JSON.parse(atob(token.split(".")[1]!.replace(/-/g, "+").replace(/_/g, "/"))).org_id).toBe("globex");
    expect(server.tokenCalls.map((form) => form.get("org_id"))).toEqual([null, "globex"]);
  });
});
