// @vitest-environment node
import { create, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import {
  BadRequestSchema,
  BadRequest_FieldViolationSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
} from "@gen/google/rpc/error_details_pb.js";
import { ErrorReason } from "@gen/opsmesh/errors/v1/errors_pb.js";
import { SignInRequired } from "../auth/auth";
import { describeError, reasonOf } from "./errors";

function detail<T extends Parameters<typeof toBinary>[0]>(schema: T, value: Parameters<typeof create<T>>[1]) {
  return { desc: schema, value: create(schema, value) } as never;
}

describe("reasonOf", () => {
  it("is the reason string the servers send: the value name without ERROR_REASON_", () => {
    expect(reasonOf(ErrorReason.MODEL_SERVER_BUSY)).toBe("MODEL_SERVER_BUSY");
    expect(reasonOf(ErrorReason.VERSION_MISMATCH)).toBe("VERSION_MISMATCH");
    expect(reasonOf(ErrorReason.DEPENDENCY_UNAVAILABLE)).toBe("DEPENDENCY_UNAVAILABLE");
  });
});

describe("describeError", () => {
  it("names a rate limit with the server's retry time (RetryInfo)", () => {
    const error = new ConnectError("busy", Code.ResourceExhausted, undefined, [
      detail(RetryInfoSchema, { retryDelay: { seconds: 7n, nanos: 0 } }),
    ]);
    const problem = describeError(error);
    expect(problem.title).toBe("Rate limited");
    expect(problem.retryAfterSeconds).toBe(7);
    expect(problem.detail).toContain("7 seconds");
  });

  it("reads Envoy's x-ratelimit-reset when the edge refused", () => {
    const error = new ConnectError("", Code.ResourceExhausted, { "x-ratelimit-reset": "42" });
    expect(describeError(error).detail).toContain("42 seconds");
  });

  it("says the model server is busy or unreachable", () => {
    const busy = new ConnectError("queue full", Code.ResourceExhausted, undefined, [
      detail(ErrorInfoSchema, { reason: reasonOf(ErrorReason.MODEL_SERVER_BUSY), domain: "opsmesh.dev" }),
      detail(RetryInfoSchema, { retryDelay: { seconds: 1n, nanos: 0 } }),
    ]);
    expect(describeError(busy).detail).toBe("The model server is busy. Try again in 1 second.");
    const down = new ConnectError("ollama is unavailable, try again later", Code.Unavailable, undefined, [
      detail(ErrorInfoSchema, { reason: reasonOf(ErrorReason.DEPENDENCY_UNAVAILABLE), metadata: { dependency: "ollama" } }),
    ]);
    expect(describeError(down).title).toBe("Model server unavailable");
    const redis = new ConnectError("redis is unavailable", Code.Unavailable, undefined, [
      detail(ErrorInfoSchema, { reason: reasonOf(ErrorReason.DEPENDENCY_UNAVAILABLE), metadata: { dependency: "redis" } }),
    ]);
    expect(describeError(redis).title).toBe("Service unavailable");
  });

  it("lists field violations of a bad request", () => {
    const error = new ConnectError("invalid", Code.InvalidArgument, undefined, [
      detail(BadRequestSchema, {
        fieldViolations: [create(BadRequest_FieldViolationSchema, { field: "message", description: "must not be empty" })],
      }),
    ]);
    expect(describeError(error).detail).toBe("message: must not be empty");
  });

  it("sends an expired sign-in back to the sign-in, and treats cancels as no failure", () => {
    expect(describeError(new ConnectError("expired", Code.Unauthenticated)).signIn).toBe(true);
    expect(describeError(new SignInRequired()).signIn).toBe(true);
    expect(describeError(new ConnectError("", Code.Canceled)).cancelled).toBe(true);
    expect(describeError(new ConnectError("no such session", Code.NotFound)).detail).toBe("no such session");
    expect(describeError(new ConnectError("llama4 is not pulled", Code.FailedPrecondition, undefined, [
      detail(ErrorInfoSchema, { reason: reasonOf(ErrorReason.MODEL_NOT_FOUND) }),
    ])).title).toBe("Model not installed");
    expect(describeError(new Error("boom")).title).toBe("Something went wrong");
    expect(describeError(new ConnectError("stalled", Code.DeadlineExceeded)).title).toBe("Timed out");
    expect(describeError(new ConnectError("", Code.PermissionDenied)).title).toBe("Not allowed");
  });

  it("an ended sign-in offers signing in again, also when a call's refresh failed in the interceptor", () => {
    const direct = describeError(new SignInRequired());
    expect(direct.signIn).toBe(true);
    const wrapped = describeError(ConnectError.from(new SignInRequired()));
    expect(wrapped).toEqual(direct);
  });
});
