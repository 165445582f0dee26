/** Who is signed in, as the access token says (for display and for hiding admin screens; the
 * services decide what the caller may do). */
export interface Identity {
  readonly subject: string;
  readonly orgId: string;
  readonly roles: readonly string[];
  /** Access token expiry, in epoch milliseconds. */
  readonly expiresAt: number;
}

function decodeSegment(segment: string): unknown {
  const base64 = segment.replace(/-/g, "+").replace(/_/g, "/");
  const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
  const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

/** Reads (does not verify) a JWT access token's claims. */
export function identityOf(accessToken: string): Identity {
  const payload = accessToken.split(".")[1];
  if (!payload) throw new Error("the access token is not a JWT");
  const claims = decodeSegment(payload) as Record<string, unknown>;
  const roles = Array.isArray(claims.roles) ? claims.roles.map(String) : [];
  if (typeof claims.sub !== "string" || typeof claims.exp !== "number") {
    throw new Error("the access token lacks sub or exp");
  }
  return {
    subject: claims.sub,
    orgId: typeof claims.org_id === "string" ? claims.org_id : "",
    roles,
    expiresAt: claims.exp * 1000,
  };
}
