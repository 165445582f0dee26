"""Developer tooling: real dependency servers for tests and the local dev stack."""
