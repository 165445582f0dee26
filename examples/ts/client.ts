// A small opsmesh client in TypeScript over grpc-web through the edge (Envoy), the transport
// the web client uses; it runs in Node.js >= 20 as well as in a browser.
//
//   npx tsc -p examples/ts && node <outDir>/examples/ts/client.js http://localhost:8080 "$TOKEN"
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { BadRequestSchema, ErrorInfoSchema } from "../../gen/ts/google/rpc/error_details_pb.js";
import { ErrorReason } from "../../gen/ts/opsmesh/errors/v1/errors_pb.js";
import { SessionService } from "../../gen/ts/opsmesh/session/v1/session_pb.js";

const [edge = "http://localhost:8080", token = ""] = process.argv.slice(2);

// Every call carries the access token; the edge verifies it and passes the identity on.
const bearer: Interceptor = (next) => (request) => {
  request.header.set("authorization", `Bearer ${token}`);
  return next(request);
};
const transport = createGrpcWebTransport({ baseUrl: edge, useBinaryFormat: true, interceptors: [bearer] });
const sessions = createClient(SessionService, transport);

const { session } = await sessions.createSession({ title: "ts example", context: { env: "dev" } });
console.log(`created session ${session?.id} version ${session?.version}`); // version: a bigint
const got = await sessions.getSession({ sessionId: session?.id ?? "" });
console.log("got session", got.session?.title, JSON.stringify(got.session?.context));

// Errors carry google.rpc details (grpc-status-details-bin); findDetails decodes them.
try {
  await sessions.getSession({ sessionId: "not-a-uuid" });
  throw new Error("expected INVALID_ARGUMENT");
} catch (thrown) {
  const error = ConnectError.from(thrown);
  console.log("error:", Code[error.code], error.rawMessage);
  for (const info of error.findDetails(ErrorInfoSchema)) {
    console.log("  ErrorInfo reason", info.reason, "domain", info.domain);
    // Reasons are the contract's ErrorReason names (generated without the ERROR_REASON_ prefix).
    if (ErrorReason[info.reason as keyof typeof ErrorReason] !== ErrorReason.INVALID_ARGUMENT) {
      throw new Error(`unexpected reason ${info.reason}`);
    }
  }
  for (const bad of error.findDetails(BadRequestSchema)) {
    for (const v of bad.fieldViolations) console.log("  BadRequest field", `${v.field}:`, v.description);
  }
}
