// @vitest-environment node
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { SessionService, SessionSchema } from "@gen/opsmesh/session/v1/session_pb.js";
import { bearerInterceptor, createApi } from "./transport";

describe("bearerInterceptor", () => {
  it("sends the token and retries a rejected unary call once after a refresh", async () => {
    const seen: string[] = [];
    let current = "old";
    const tokens = {
      accessToken: async () => current,
      refresh: async () => {
        current = "new";
      },
    };
    const transport = createRouterTransport(
      (router) =>
        router.service(SessionService, {
          getSession(request, context) {
            const auth = context.requestHeader.get("authorization") ?? "";
            seen.push(auth);
            if (auth !== "Bearer new") throw new ConnectError("revoked", Code.Unauthenticated);
            return { session: create(SessionSchema, { id: request.sessionId }) };
          },
        }),
      { transport: { interceptors: [bearerInterceptor(tokens)] } },
    );
    const api = createApi(transport);
    const reply = await api.sessions.getSession({ sessionId: "s1" });
    expect(reply.session?.id).toBe("s1");
    expect(seen).toEqual(["Bearer old", "Bearer new"]);
  });

  it("does not retry other errors", async () => {
    let calls = 0;
    const transport = createRouterTransport(
      (router) =>
        router.service(SessionService, {
          getSession() {
            calls += 1;
            throw new ConnectError("gone", Code.NotFound);
          },
        }),
      { transport: { interceptors: [bearerInterceptor({ accessToken: async () => "t", refresh: async () => {} })] } },
    );
    await expect(createApi(transport).sessions.getSession({ sessionId: "x" })).rejects.toThrow("gone");
    expect(calls).toBe(1);
  });
});
