/// <reference types="vite/client" />

interface ImportMetaEnv {
  readonly VITE_OPSMESH_API_URL?: string;
  readonly VITE_OPSMESH_ISSUER?: string;
  readonly VITE_OPSMESH_CLIENT_ID?: string;
}
