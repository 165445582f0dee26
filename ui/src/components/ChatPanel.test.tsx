import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import { render, screen, waitFor } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { describe, expect, it, vi } from "vitest";
import {
  ChatService,
  DoneReason,
  MessageRole,
  ChatMessageSchema,
  StreamChatResponseSchema,
} from "@gen/opsmesh/chat/v1/chat_pb.js";
import { createApi } from "../api/transport";
import { deferred } from "../test/deferred";
import { ChatPanel } from "./ChatPanel";

type Event = MessageInitShape<typeof StreamChatResponseSchema>["event"];
const event = (value: Event) => create(StreamChatResponseSchema, { event: value });

describe("ChatPanel", () => {
  it("streams an answer, shows a tool call waiting for approval and sends the decision", async () => {
    const decided = deferred();
    const decisions: { toolCallId: string; approved: boolean }[] = [];
    const transport = createRouterTransport((router) =>
      router.service(ChatService, {
        async *streamChat(request) {
          expect(request.clientMessageId).not.toBe("");
          yield event({ case: "started", value: { generationId: "g1", model: "llama3.2:3b" } });
          yield event({ case: "delta", value: { content: "Checking the ", tokenCount: 1 } });
          yield event({
            case: "toolCall",
            value: { toolCallId: "c1", name: "workspace_provision", arguments: { workspace: "team-a" }, requiresApproval: true },
          });
          yield event({
            case: "approvalRequired",
            value: {
              toolCallId: "c1",
              name: "workspace_provision",
              arguments: { workspace: "team-a" },
              description: "Creates the namespace team-a",
              deadline: timestampFromDate(new Date(Date.now() + 60_000)),
            },
          });
          await decided.promise;
          yield event({ case: "toolResult", value: { toolCallId: "c1", name: "workspace_provision", content: "task t-1 queued" } });
          yield event({ case: "delta", value: { content: "workspace.", tokenCount: 1 } });
          yield event({ case: "completed", value: { doneReason: DoneReason.STOP } });
        },
        decideToolCall(request) {
          decisions.push({ toolCallId: request.toolCallId, approved: request.approved });
          decided.resolve();
          return { accepted: true };
        },
        getHistory: () => ({
          messages: [
            create(ChatMessageSchema, { id: "m2", role: MessageRole.ASSISTANT, content: "Earlier answer", incomplete: true }),
            create(ChatMessageSchema, { id: "m1", role: MessageRole.USER, content: "Earlier question" }),
          ],
        }),
        listModels: () => ({ models: [] }),
      }),
    );
    const onError = vi.fn();
    render(<ChatPanel api={createApi(transport)} auth={{ refresh: async () => {} }} sessionId="s1" onError={onError} />);

    const history = await screen.findAllByTestId("history-message");
    expect(history.map((m) => m.textContent)).toEqual([
      expect.stringContaining("Earlier question"),
      expect.stringContaining("Earlier answer"),
    ]);
    expect(history[1]?.textContent).toContain("stopped before the end");

    const user = userEvent.setup();
    await user.type(screen.getByLabelText("Message"), "Provision team-a{Enter}");
    expect(await screen.findByText("Creates the namespace team-a")).toBeTruthy();
    expect(screen.getByRole("region", { name: "Tool call workspace_provision" }).textContent).toContain('"workspace": "team-a"');
    expect(screen.getByRole("button", { name: "Stop" })).toBeTruthy();

    await user.click(screen.getByRole("button", { name: "Approve" }));
    await waitFor(() => expect(screen.getByTestId("answer").getAttribute("data-status")).toBe("done"));
    expect(decisions).toEqual([{ toolCallId: "c1", approved: true }]);
    expect(screen.getByTestId("answer-text").textContent).toBe("Checking the workspace.");
    expect(screen.getByText("task t-1 queued")).toBeTruthy();
    expect(screen.getByTestId("approval-outcome").textContent).toBe("Approved");
    expect(screen.queryByRole("button", { name: "Approve" })).toBeNull();
    expect(onError).not.toHaveBeenCalled();
  });

  it("Stop asks the server to stop the generation and shows the partial answer as stopped", async () => {
    const stopped = deferred();
    const stops: string[] = [];
    const transport = createRouterTransport((router) =>
      router.service(ChatService, {
        async *streamChat() {
          yield event({ case: "started", value: { generationId: "g7" } });
          yield event({ case: "delta", value: { content: "partial" } });
          await stopped.promise;
          yield event({ case: "completed", value: { doneReason: DoneReason.CANCELLED, incomplete: true } });
        },
        stopGeneration(request) {
          stops.push(request.generationId);
          stopped.resolve();
          return { stopped: true };
        },
        getHistory: () => ({ messages: [] }),
        listModels: () => ({ models: [] }),
      }),
    );
    render(<ChatPanel api={createApi(transport)} auth={{ refresh: async () => {} }} sessionId="s1" onError={vi.fn()} />);
    const user = userEvent.setup();
    await user.type(screen.getByLabelText("Message"), "long answer please");
    await user.click(screen.getByRole("button", { name: "Send" }));
    await screen.findByText("partial");
    await user.click(screen.getByRole("button", { name: "Stop" }));
    await waitFor(() => expect(screen.getByTestId("answer").getAttribute("data-status")).toBe("stopped"));
    expect(stops).toEqual(["g7"]);
    expect(screen.getByText("Stopped.")).toBeTruthy();
  });

  it("explains a failure in words, and retries once after refreshing an expired token", async () => {
    let calls = 0;
    const refresh = vi.fn(async () => {});
    const transport = createRouterTransport((router) =>
      router.service(ChatService, {
        // eslint-disable-next-line require-yield
        async *streamChat() {
          calls += 1;
          if (calls === 1) throw new ConnectError("token expired", Code.Unauthenticated);
          throw new ConnectError("ollama is unavailable, try again later (the model server at http://gpu:11434 is unreachable)", Code.Unavailable);
        },
        getHistory: () => ({ messages: [] }),
        listModels: () => {
          throw new ConnectError("down", Code.Unavailable);
        },
      }),
    );
    render(<ChatPanel api={createApi(transport)} auth={{ refresh }} sessionId="s1" onError={vi.fn()} />);
    const user = userEvent.setup();
    await user.type(screen.getByLabelText("Message"), "hello{Enter}");
    expect(await screen.findByRole("alert")).toBeTruthy();
    expect(screen.getByRole("alert").textContent).toContain("Model server unavailable");
    expect(screen.getByRole("alert").textContent).toContain("http://gpu:11434");
    expect(refresh).toHaveBeenCalledTimes(1);
    expect(calls).toBe(2);
    expect(screen.getByTestId("answer").getAttribute("data-status")).toBe("failed");
  });
});
