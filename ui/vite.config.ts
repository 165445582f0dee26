import { fileURLToPath } from "node:url";
import react from "@vitejs/plugin-react";
import { defineConfig } from "vitest/config";

// The generated contracts live outside ui/ (gen/ts, shared with every client); they resolve
// @bufbuild/protobuf from the workspace root's node_modules.
const generated = fileURLToPath(new URL("../gen/ts", import.meta.url));

export default defineConfig({
  plugins: [react()],
  resolve: { alias: { "@gen": generated } },
  // make ui-dev: the port `make up` allows in CORS and as an OAuth redirect (OPSMESH_DEV_UI_PORT).
  server: { port: Number(process.env.OPSMESH_DEV_UI_PORT || 5173), strictPort: true },
  build: { outDir: "dist", sourcemap: true, target: "es2022" },
  test: {
    environment: "jsdom",
    include: ["src/**/*.test.{ts,tsx}"],
    setupFiles: ["src/test/setup.ts"],
    restoreMocks: true,
  },
});
