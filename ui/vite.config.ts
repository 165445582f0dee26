import { fileURLToPath } from "node:url";
import react from "@vitejs/plugin-react";
import { defineConfig } from "vitest/config";

// The generated contracts live outside ui/ (gen/ts, shared with every client); they resolve
// @bufbuild/protobuf from the workspace root's node_modules.
const generated = fileURLToPath(new URL("../gen/ts", import.meta.url));

export default defineConfig({
  plugins: [react()],
  resolve: { alias: { "@gen": generated } },
  server: { port: 5173, strictPort: true },
  build: { outDir: "dist", sourcemap: true, target: "es2022" },
  test: {
    environment: "jsdom",
    include: ["src/**/*.test.{ts,tsx}"],
    setupFiles: ["src/test/setup.ts"],
    restoreMocks: true,
  },
});
