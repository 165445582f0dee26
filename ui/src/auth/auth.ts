import * as oauth from "oauth4webapi";
import { identityOf, type Identity } from "./claims";

/**
 * Authorization code + PKCE (S256) sign-in against identity_svc, with rotating refresh tokens.
 *
 * Token storage, as safely as a public client in a browser can:
 * - the access token (short-lived JWT) lives in memory only;
 * - the refresh token lives in memory and in sessionStorage, so a reload of the tab stays signed
 *   in. sessionStorage is per tab and cleared when the tab closes; script injected into the page
 *   could read it, which the edge's strict Content-Security-Policy guards against, and a stolen
 *   token is single use: presenting a spent one revokes the whole family (RFC 9700 §4.14.2).
 *   Memory only would be safer still, at the price of signing in again on every reload.
 */
export interface AuthOptions {
  readonly issuer: string;
  readonly clientId: string;
  readonly redirectUri: string;
  /** Where pending sign-ins and the refresh token are kept (window.sessionStorage). */
  readonly storage: Storage;
  /** Refresh this long before the access token expires. */
  readonly refreshSkewMs?: number;
  readonly now?: () => number;
  readonly fetch?: typeof fetch;
}

/** The refresh token no longer works (expired, revoked, reused): sign in again. */
export class SignInRequired extends Error {
  constructor(message = "Your session has ended. Please sign in again.") {
    super(message);
    this.name = "SignInRequired";
  }
}

const PENDING_KEY = "opsmesh.auth.pending";
const REFRESH_KEY = "opsmesh.auth.refresh";

/** The refresh-token grant's form parameter naming another organization of the user: the
 * authorization server answers with tokens for that organization (docs/identity.md). */
export const ORGANIZATION_PARAMETER = "org_id";

/** The authorization server would not issue tokens for the chosen organization (the user is not,
 * or no longer, a member); the sign-in for the current organization stays as it was. */
export class OrganizationSwitchRefused extends Error {
  constructor(message: string) {
    super(message);
    this.name = "OrganizationSwitchRefused";
  }
}

interface PendingSignIn {
  readonly verifier: string;
  readonly state: string;
  readonly nonce: string;
  readonly returnTo: string;
}

export type AuthListener = (identity: Identity | null) => void;

export class AuthClient {
  private readonly client: oauth.Client;
  private readonly issuerUrl: URL;
  private readonly skew: number;
  private readonly now: () => number;
  private discovered: Promise<oauth.AuthorizationServer> | null = null;
  private access: { token: string; identity: Identity } | null = null;
  private refreshToken: string | null;
  private refreshing: Promise<void> | null = null;
  private readonly listeners = new Set<AuthListener>();

  constructor(private readonly options: AuthOptions) {
    this.client = { client_id: options.clientId };
    this.issuerUrl = new URL(options.issuer);
    this.skew = options.refreshSkewMs ?? 60_000;
    this.now = options.now ?? Date.now;
    this.refreshToken = options.storage.getItem(REFRESH_KEY);
  }

  /** Signed in now (an access token in memory), or null. */
  get identity(): Identity | null {
    return this.access?.identity ?? null;
  }

  /** A refresh token is kept: a reload can restore the sign-in without the login page. */
  get canRestore(): boolean {
    return this.refreshToken !== null;
  }

  subscribe(listener: AuthListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private http(): Record<symbol, unknown> {
    const options: Record<symbol, unknown> = {
      // http://localhost in development; production issuers are https and need no exception.
      [oauth.allowInsecureRequests]: this.issuerUrl.protocol === "http:",
    };
    if (this.options.fetch) options[oauth.customFetch] = this.options.fetch;
    return options;
  }

  private server(): Promise<oauth.AuthorizationServer> {
    this.discovered ??= oauth
      .discoveryRequest(this.issuerUrl, { algorithm: "oidc", ...this.http() })
      .then((response) => oauth.processDiscoveryResponse(this.issuerUrl, response))
      .catch((error: unknown) => {
        this.discovered = null; // a later attempt may find the server up
        throw error;
      });
    return this.discovered;
  }

  /** The authorization URL to send the browser to; remembers what the callback must check. */
  async beginSignIn(returnTo = "/"): Promise<URL> {
    const as = await this.server();
    if (!as.authorization_endpoint) throw new Error("the issuer has no authorization endpoint");
    const pending: PendingSignIn = {
      verifier: oauth.generateRandomCodeVerifier(),
      state: oauth.generateRandomState(),
      nonce: oauth.generateRandomNonce(),
      returnTo: returnTo.startsWith("/") && !returnTo.startsWith("//") ? returnTo : "/",
    };
    this.options.storage.setItem(PENDING_KEY, JSON.stringify(pending));
    const url = new URL(as.authorization_endpoint);
    url.search = new URLSearchParams({
      response_type: "code",
      client_id: this.client.client_id,
      redirect_uri: this.options.redirectUri,
      scope: "openid offline_access",
      state: pending.state,
      nonce: pending.nonce,
      code_challenge: await oauth.calculatePKCECodeChallenge(pending.verifier),
      code_challenge_method: "S256",
    }).toString();
    return url;
  }

  /** Finishes a sign-in at the redirect URI: checks state, iss, PKCE and the ID token's nonce.
   * Returns the path the user was on. */
  async completeSignIn(callback: URL): Promise<string> {
    const raw = this.options.storage.getItem(PENDING_KEY);
    this.options.storage.removeItem(PENDING_KEY); // one attempt per sign-in
    if (!raw) throw new Error("No sign-in was started in this tab; please sign in again.");
    const pending = JSON.parse(raw) as PendingSignIn;
    const as = await this.server();
    const params = oauth.validateAuthResponse(as, this.client, callback, pending.state);
    const response = await oauth.authorizationCodeGrantRequest(
      as,
      this.client,
      oauth.None(),
      params,
      this.options.redirectUri,
      pending.verifier,
      this.http(),
    );
    const tokens = await oauth.processAuthorizationCodeResponse(as, this.client, response, {
      expectedNonce: pending.nonce,
      requireIdToken: true,
    });
    this.accept(tokens);
    return pending.returnTo;
  }

  /** A valid access token, refreshed first when it is about to expire. */
  async accessToken(): Promise<string> {
    // An exchange under way (an organization switch) decides which token is current.
    if (this.refreshing) await this.refreshing.catch(() => undefined);
    if (this.access && this.access.identity.expiresAt - this.skew > this.now()) {
      return this.access.token;
    }
    await this.refresh();
    if (!this.access) throw new SignInRequired();
    return this.access.token;
  }

  /** Exchanges the refresh token for new tokens. Concurrent callers share one exchange, so a
   * burst of calls never spends the same single-use refresh token twice. */
  refresh(): Promise<void> {
    if (!this.refreshing) {
      const refreshing: Promise<void> = this.exchangeRefreshToken().finally(() => {
        // A switch queued behind this refresh has taken its place: leave that one.
        if (this.refreshing === refreshing) this.refreshing = null;
      });
      this.refreshing = refreshing;
    }
    return this.refreshing;
  }

  /**
   * Tokens for another organization of the user, without a password prompt: the refresh-token
   * grant naming that organization. It waits for a refresh under way (the refresh token is
   * single use) and is itself the exchange that concurrent calls wait for, so calls made
   * meanwhile already carry the new organization's token.
   */
  switchOrganization(orgId: string): Promise<void> {
    const before = this.refreshing ?? Promise.resolve();
    const switching: Promise<void> = before
      .catch(() => undefined) // a failed refresh is reported to its own caller; try anyway
      .then(() => this.exchangeRefreshToken(orgId))
      .finally(() => {
        if (this.refreshing === switching) this.refreshing = null;
      });
    this.refreshing = switching;
    return switching;
  }

  private async exchangeRefreshToken(orgId?: string): Promise<void> {
    const token = this.refreshToken;
    if (!token) {
      this.clear();
      throw new SignInRequired("Please sign in.");
    }
    const as = await this.server();
    const response = await oauth.refreshTokenGrantRequest(as, this.client, oauth.None(), token, {
      ...this.http(),
      ...(orgId === undefined ? {} : { additionalParameters: { [ORGANIZATION_PARAMETER]: orgId } }),
    });
    let tokens: oauth.TokenEndpointResponse;
    try {
      tokens = await oauth.processRefreshTokenResponse(as, this.client, response);
    } catch (error) {
      if (!(error instanceof oauth.ResponseBodyError)) throw error; // unreachable: keep the token
      if (orgId !== undefined && error.error !== "invalid_grant") {
        // Refused for that organization only: the refresh token was not spent, stay signed in.
        throw new OrganizationSwitchRefused(error.error_description ?? "You cannot switch to that organization.");
      }
      this.clear(); // invalid_grant: expired, revoked or reused — the family is gone
      throw new SignInRequired();
    }
    this.accept(tokens); // the old refresh token is spent: keep whatever came back
    const issuedFor = this.identity?.orgId ?? "";
    if (orgId !== undefined && issuedFor !== orgId) {
      throw new OrganizationSwitchRefused(`The server issued tokens for ${issuedFor || "no organization"}.`);
    }
  }

  /** Revokes the refresh token's family at the server and forgets every token. */
  async signOut(): Promise<void> {
    const token = this.refreshToken;
    this.clear();
    if (!token) return;
    const as = await this.server();
    if (!as.revocation_endpoint) return;
    const response = await oauth.revocationRequest(as, this.client, oauth.None(), token, {
      ...this.http(),
      additionalParameters: { token_type_hint: "refresh_token" },
    });
    await oauth.processRevocationResponse(response);
  }

  private accept(tokens: oauth.TokenEndpointResponse): void {
    this.access = { token: tokens.access_token, identity: identityOf(tokens.access_token) };
    if (tokens.refresh_token) {
      this.refreshToken = tokens.refresh_token;
      this.options.storage.setItem(REFRESH_KEY, tokens.refresh_token);
    }
    this.notify();
  }

  private clear(): void {
    const wasSignedIn = this.access !== null;
    this.access = null;
    this.refreshToken = null;
    this.options.storage.removeItem(REFRESH_KEY);
    if (wasSignedIn) this.notify();
  }

  private notify(): void {
    for (const listener of this.listeners) listener(this.identity);
  }
}
