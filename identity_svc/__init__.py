"""opsmesh identity service: OAuth 2.1 authorization server, local accounts, signing keys
(opsmesh.identity.v1.IdentityService over gRPC, OAuth and JWKS over HTTP)."""
