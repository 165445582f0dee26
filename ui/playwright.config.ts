import { defineConfig } from "@playwright/test";

// Drives Debian's Chromium (no browser download) against a running stack: `make up`, or the one
// tests/test_web_e2e.py starts on free ports. Artifacts (screenshots, traces) go to build/e2e.
const chromium = process.env.OPSMESH_E2E_CHROMIUM ?? "/usr/bin/chromium";

export default defineConfig({
  testDir: "e2e",
  outputDir: "../build/e2e/results",
  timeout: 60_000,
  expect: { timeout: 15_000 },
  fullyParallel: false,
  workers: 1,
  retries: 0,
  reporter: [["list"]],
  use: {
    baseURL: process.env.OPSMESH_E2E_URL ?? "http://localhost:8080",
    browserName: "chromium",
    trace: "retain-on-failure",
    screenshot: "only-on-failure",
    launchOptions: {
      executablePath: chromium,
      args: [
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    },
  },
});
