import { Code, ConnectError } from "@connectrpc/connect";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "@gen/google/rpc/error_details_pb.js";
import { ErrorReason } from "@gen/opsmesh/errors/v1/errors_pb.js";
import { OrganizationSwitchRefused, SignInRequired } from "../auth/auth";

/** An error as the user reads it. */
export interface Problem {
  readonly title: string;
  readonly detail: string;
  /** Seconds until trying again makes sense, when the server said. */
  readonly retryAfterSeconds?: number;
  /** The sign-in ended: the only way on is signing in again. */
  readonly signIn?: boolean;
  /** The user stopped it: not worth a warning. */
  readonly cancelled?: boolean;
}

/**
 * The `ErrorInfo.reason` string of a reason of the contract (proto/opsmesh/errors/v1/errors.proto):
 * the enum value's name without `ERROR_REASON_`, which is the generated member's name.
 */
export function reasonOf(reason: ErrorReason): string {
  return ErrorReason[reason];
}

function retryAfter(error: ConnectError): number | undefined {
  const info = error.findDetails(RetryInfoSchema)[0];
  if (info?.retryDelay) {
    return Math.max(1, Math.ceil(Number(info.retryDelay.seconds) + info.retryDelay.nanos / 1e9));
  }
  // Envoy's rate limit answers carry the draft-03 headers, not RetryInfo.
  for (const header of ["retry-after", "x-ratelimit-reset"]) {
    const value = Number(error.metadata.get(header));
    if (Number.isFinite(value) && value > 0) return Math.ceil(value);
  }
  return undefined;
}

function plural(n: number, unit: string): string {
  return `${n} ${unit}${n === 1 ? "" : "s"}`;
}

/** The server's complaints about a request's fields (google.rpc.BadRequest), by field name, so a
 * form can show each one next to its input. */
export function fieldViolations(error: unknown): Record<string, string> {
  const found: Record<string, string> = {};
  for (const bad of ConnectError.from(error).findDetails(BadRequestSchema)) {
    for (const violation of bad.fieldViolations) found[violation.field] ??= violation.description;
  }
  return found;
}

/** Words for any error a call can end with. */
export function describeError(error: unknown): Problem {
  // A refresh that fails inside the transport's interceptor reaches the caller wrapped in a
  // ConnectError (code Unknown) whose cause is the original error.
  const original = error instanceof ConnectError && error.cause instanceof Error ? error.cause : error;
  if (original instanceof SignInRequired) {
    return { title: "Signed out", detail: original.message, signIn: true };
  }
  if (original instanceof OrganizationSwitchRefused) {
    return { title: "Organization not switched", detail: original.message };
  }
  const failure = ConnectError.from(error);
  const info = failure.findDetails(ErrorInfoSchema)[0];
  const reason = info?.reason ?? "";
  const message = failure.rawMessage;
  switch (failure.code) {
    case Code.Canceled:
      return { title: "Stopped", detail: "The request was cancelled.", cancelled: true };
    case Code.Unauthenticated:
      return {
        title: "Session expired",
        detail: "Your sign-in is no longer valid. Please sign in again.",
        signIn: true,
      };
    case Code.PermissionDenied:
      return { title: "Not allowed", detail: message || "You may not do this." };
    case Code.NotFound:
      return { title: "Not found", detail: message || "It does not exist or is not yours." };
    case Code.AlreadyExists:
      return { title: "Already there", detail: message || "It exists already." };
    case Code.InvalidArgument: {
      const violations = failure
        .findDetails(BadRequestSchema)
        .flatMap((bad) => bad.fieldViolations.map((v) => `${v.field}: ${v.description}`));
      return { title: "Invalid request", detail: violations.join("; ") || message };
    }
    case Code.ResourceExhausted: {
      const seconds = retryAfter(failure);
      const wait = seconds ? ` Try again in ${plural(seconds, "second")}.` : " Try again shortly.";
      if (reason === reasonOf(ErrorReason.MODEL_SERVER_BUSY)) {
        return { title: "Model busy", detail: `The model server is busy.${wait}`, retryAfterSeconds: seconds };
      }
      return { title: "Rate limited", detail: `Too many requests.${wait}`, retryAfterSeconds: seconds };
    }
    case Code.FailedPrecondition:
      return {
        title: reason === reasonOf(ErrorReason.MODEL_NOT_FOUND) ? "Model not installed" : "Not possible now",
        detail: message,
      };
    case Code.DeadlineExceeded:
      return { title: "Timed out", detail: message || "The server took too long to answer." };
    case Code.Unavailable: {
      const seconds = retryAfter(failure);
      if (info?.metadata.dependency === "ollama" || /model server|model failed/.test(message)) {
        return {
          title: "Model server unavailable",
          detail: `${message || "The model server (Ollama) cannot be reached."}`,
          retryAfterSeconds: seconds,
        };
      }
      return {
        title: "Service unavailable",
        detail: message || "The service cannot be reached right now. Try again shortly.",
        retryAfterSeconds: seconds,
      };
    }
    default:
      return {
        title: "Something went wrong",
        detail: message || "An unexpected error happened. Try again; if it persists, tell an operator.",
      };
  }
}
