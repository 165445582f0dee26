/** Where the client finds the edge and the authorization server. */
export interface ClientConfig {
  /** Base URL of the Envoy edge that serves grpc-web. */
  readonly apiUrl: string;
  /** OAuth issuer identifier (the discovery document must name exactly this). */
  readonly issuer: string;
  /** The public OAuth client registered with identity_svc. */
  readonly clientId: string;
  /** Where the authorization server sends the browser back. */
  readonly redirectUri: string;
}

function trimSlash(url: string): string {
  return url.replace(/\/+$/, "");
}

/**
 * Served by the edge (make up, production) everything is same-origin; `vite` dev points at the
 * edge on 8080 with VITE_OPSMESH_API_URL / VITE_OPSMESH_ISSUER.
 */
export function loadConfig(origin: string = window.location.origin): ClientConfig {
  const env = import.meta.env;
  const apiUrl = trimSlash(env.VITE_OPSMESH_API_URL || origin);
  return {
    apiUrl,
    issuer: trimSlash(env.VITE_OPSMESH_ISSUER || apiUrl),
    clientId: env.VITE_OPSMESH_CLIENT_ID || "opsmesh-web",
    redirectUri: `${trimSlash(origin)}/oauth/callback`,
  };
}
