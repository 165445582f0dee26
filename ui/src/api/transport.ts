import { Code, ConnectError, createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import type { DescService } from "@bufbuild/protobuf";
import { ChatService } from "@gen/opsmesh/chat/v1/chat_pb.js";
import { OrganizationService } from "@gen/opsmesh/identity/v1/organization_pb.js";
import { NotificationService } from "@gen/opsmesh/notify/v1/notify_pb.js";
import { SessionService } from "@gen/opsmesh/session/v1/session_pb.js";
import { TaskService } from "@gen/opsmesh/task/v1/task_pb.js";

/** What the transport needs from the sign-in: a fresh token, and a refresh on rejection. */
export interface TokenSource {
  accessToken(): Promise<string>;
  refresh(): Promise<void>;
}

/**
 * Adds the bearer token to every call. A unary call the edge rejects as UNAUTHENTICATED (a
 * token revoked or signed with a rotated-out key) is retried once after a refresh; streams are
 * not replayed here (their request is consumed) — callers retry those themselves.
 */
export function bearerInterceptor(tokens: TokenSource): Interceptor {
  return (next) => async (request) => {
    request.header.set("authorization", `Bearer ${await tokens.accessToken()}`);
    try {
      return await next(request);
    } catch (error) {
      if (request.stream || ConnectError.from(error).code !== Code.Unauthenticated) throw error;
      await tokens.refresh();
      request.header.set("authorization", `Bearer ${await tokens.accessToken()}`);
      return await next(request);
    }
  };
}

export function edgeTransport(apiUrl: string, tokens: TokenSource): Transport {
  return createGrpcWebTransport({
    baseUrl: apiUrl,
    useBinaryFormat: true,
    interceptors: [bearerInterceptor(tokens)],
  });
}

export interface Api {
  readonly chat: Client<typeof ChatService>;
  readonly sessions: Client<typeof SessionService>;
  readonly tasks: Client<typeof TaskService>;
  readonly notify: Client<typeof NotificationService>;
  readonly organizations: Client<typeof OrganizationService>;
}

export function createApi(transport: Transport): Api {
  const client = <S extends DescService>(service: S): Client<S> => createClient(service, transport);
  return {
    chat: client(ChatService),
    sessions: client(SessionService),
    tasks: client(TaskService),
    notify: client(NotificationService),
    organizations: client(OrganizationService),
  };
}
