import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { createApi, edgeTransport } from "./api/transport";
import { App } from "./App";
import { AuthClient } from "./auth/auth";
import { loadConfig } from "./config";
import "./styles.css";

const config = loadConfig();
const auth = new AuthClient({
  issuer: config.issuer,
  clientId: config.clientId,
  redirectUri: config.redirectUri,
  storage: window.sessionStorage,
});
const api = createApi(edgeTransport(config.apiUrl, auth));

const root = document.getElementById("root");
if (!root) throw new Error("index.html has no #root");
createRoot(root).render(
  <StrictMode>
    <App auth={auth} api={api} />
  </StrictMode>,
);
