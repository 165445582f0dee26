import { create, type JsonObject } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import { act, render, screen, waitFor, within } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { describe, expect, it, vi } from "vitest";
import {
  ChatMessageSchema,
  ChatService,
  DoneReason,
  MessageRole,
  PendingApprovalSchema,
  StreamChatResponseSchema,
  type ChatMessage,
  type DecideToolCallRequest,
  type GetHistoryRequest,
} from "@gen/opsmesh/chat/v1/chat_pb.js";
import { createApi } from "../api/transport";
import { deferred } from "../test/deferred";
import { ChatPanel } from "./ChatPanel";

type Service = Parameters<typeof createRouterTransport>[0];

const question = create(ChatMessageSchema, {
  id: "u1",
  role: MessageRole.USER,
  content: "provision a workspace for team X",
  metadata: { generation_id: "g-1" },
});

function waiting(generationId: string, toolCallId: string, workspace: string) {
  return create(PendingApprovalSchema, {
    generationId,
    approval: {
      toolCallId,
      name: "provision_workspace",
      arguments: { workspace },
      description: `Creates the workspace ${workspace}`,
      deadline: timestampFromDate(new Date(Date.now() + 120_000)),
    },
  });
}

function loggedCall(toolCallId: string, decision: string, result?: JsonObject): JsonObject {
  return {
    tool_call_id: toolCallId,
    name: "provision_workspace",
    arguments: { workspace: "team-x" },
    requires_approval: true,
    approval: { description: "Creates the workspace team-x", decision },
    ...(result ? { result } : {}),
  };
}

function answer(id: string, content: string, tools: JsonObject[]): ChatMessage {
  return create(ChatMessageSchema, {
    id,
    role: MessageRole.ASSISTANT,
    content,
    metadata: { agent: "operations", tools },
  });
}

function panel(service: Service, sessionId = "s1") {
  const onError = vi.fn();
  const api = createApi(createRouterTransport(service));
  const auth = { refresh: async () => {} };
  const view = render(<ChatPanel api={api} auth={auth} sessionId={sessionId} onError={onError} />);
  const switchTo = (session: string) =>
    view.rerender(<ChatPanel api={api} auth={auth} sessionId={session} onError={onError} />);
  return { onError, view, switchTo };
}

/** Newest first, as the panel asks for it. */
const newestFirst = (messages: ChatMessage[]) => [...messages].reverse();

describe("ChatPanel: approvals still waiting after a reload", () => {
  it("approve: the card has buttons, DecideToolCall gets the ids, the answer shows once the history has it", async () => {
    const decisions: DecideToolCallRequest[] = [];
    const historyCalls: GetHistoryRequest[] = [];
    let stored: ChatMessage[] = [question];
    const { onError } = panel((router) =>
      router.service(ChatService, {
        getHistory(request) {
          historyCalls.push(request);
          // The answer lands a moment after the decision: the second look finds it.
          if (decisions.length && historyCalls.length === 3) {
            stored = [
              question,
              answer("a1", "Workspace **team-x** is being provisioned.", [
                loggedCall("call-1", "approved", { content: "task t-42 queued", is_error: false, duration_ms: 80 }),
              ]),
            ];
          }
          return { messages: newestFirst(stored) };
        },
        listApprovals: (request) => {
          expect(request.sessionId).toBe("s1");
          return { approvals: [waiting("g-1", "call-1", "team-x")] };
        },
        decideToolCall(request) {
          decisions.push(request);
          return { accepted: true };
        },
        listModels: () => ({ models: [] }),
      }),
    );

    const block = await screen.findByRole("article", { name: "Waiting for your decision" });
    const card = within(block).getByRole("region", { name: "Tool call provision_workspace" });
    expect(within(card).getByText("Creates the workspace team-x")).toBeTruthy();
    expect(card.textContent).toContain('"workspace": "team-x"');
    expect(within(card).getByRole("timer").textContent).toMatch(/^[12]:\d\d$/);
    expect(within(card).queryByText("Waiting for approval.")).toBeNull();
    // The waiting block comes after the history.
    const [stored1] = screen.getAllByTestId("history-message");
    expect(stored1!.compareDocumentPosition(block) & Node.DOCUMENT_POSITION_FOLLOWING).toBeTruthy();

    const user = userEvent.setup();
    await user.click(within(card).getByRole("button", { name: "Approve" }));
    expect(decisions.map((d) => [d.generationId, d.toolCallId, d.approved])).toEqual([["g-1", "call-1", true]]);
    expect(await within(block).findByText("Waiting for the answer…")).toBeTruthy();
    expect(within(block).getByText("Waiting for the answer…").getAttribute("aria-live")).toBe("polite");
    expect(within(card).getByRole("status").textContent).toBe("Approved");
    expect(within(card).queryByRole("button", { name: "Approve" })).toBeNull();

    await waitFor(() => expect(screen.getAllByTestId("history-message")).toHaveLength(2), { timeout: 5000 });
    expect(screen.queryByRole("article", { name: "Waiting for your decision" })).toBeNull();
    expect(screen.queryByText("Waiting for the answer…")).toBeNull();
    const stored2 = screen.getAllByTestId("history-message")[1]!;
    await waitFor(() => expect(stored2.querySelector("strong")?.textContent).toBe("team-x"));
    const storedCard = within(stored2).getByRole("region", { name: "Tool call provision_workspace" });
    expect(within(storedCard).getByRole("status").textContent).toBe("Approved");
    expect(storedCard.getAttribute("data-status")).toBe("done");
    expect(within(storedCard).getByText("task t-42 queued")).toBeTruthy();
    // Load, then a look that found nothing, then the one that found the answer: newest page each time.
    expect(historyCalls).toHaveLength(3);
    expect(historyCalls.every((r) => r.pageToken === "")).toBe(true);
    expect(onError).not.toHaveBeenCalled();
  });

  it("reject: a call logged in a stored answer gets its buttons there; the new answer follows", async () => {
    const decisions: DecideToolCallRequest[] = [];
    const early = answer("a1", "I need your approval first.", [loggedCall("call-2", "pending")]);
    let stored: ChatMessage[] = [question, early];
    panel((router) =>
      router.service(ChatService, {
        getHistory: () => ({ messages: newestFirst(stored) }),
        listApprovals: () => ({ approvals: [waiting("g-1", "call-2", "team-x")] }),
        decideToolCall(request) {
          decisions.push(request);
          stored = [
            question,
            early,
            answer("a2", "Understood, nothing was changed.", [
              loggedCall("call-2", "rejected", { content: "The user rejected this call.", is_error: true }),
            ]),
          ];
          return { accepted: true };
        },
        listModels: () => ({ models: [] }),
      }),
    );
    const messages = await screen.findAllByTestId("history-message");
    const card = await within(messages[1]!).findByRole("region", { name: "Tool call provision_workspace" });
    const reject = await within(card).findByRole("button", { name: "Reject" });
    expect(screen.queryByRole("article", { name: "Waiting for your decision" })).toBeNull();
    expect(within(card).getByText("Creates the workspace team-x")).toBeTruthy();

    const user = userEvent.setup();
    await user.click(reject);
    expect(decisions.map((d) => [d.generationId, d.toolCallId, d.approved])).toEqual([["g-1", "call-2", false]]);
    expect(within(messages[1]!).getByText("Waiting for the answer…")).toBeTruthy();

    await screen.findByText("Understood, nothing was changed.", {}, { timeout: 5000 });
    expect(screen.getAllByTestId("history-message")).toHaveLength(3);
    expect(screen.queryByText("Waiting for the answer…")).toBeNull();
    expect(screen.queryAllByRole("button", { name: /Approve|Reject/ })).toEqual([]);
    // The stored log of the first answer still says pending: the card shows the decision made here.
    const [first, second] = screen
      .getAllByTestId("history-message")
      .slice(1)
      .map((m) => within(m).getByRole("region", { name: "Tool call provision_workspace" }));
    expect(within(first!).getByRole("status").textContent).toBe("Rejected");
    expect(within(second!).getByRole("status").textContent).toBe("Rejected");
    expect(second!.getAttribute("data-status")).toBe("rejected");
  });

  it("a refused decision says so on the card and looks for no answer", async () => {
    let historyCalls = 0;
    panel((router) =>
      router.service(ChatService, {
        getHistory: () => {
          historyCalls += 1;
          return { messages: [question] };
        },
        listApprovals: () => ({ approvals: [waiting("g-1", "call-3", "team-x")] }),
        decideToolCall: () => ({ accepted: false }),
        listModels: () => ({ models: [] }),
      }),
    );
    const user = userEvent.setup();
    await user.click(await screen.findByRole("button", { name: "Approve" }));
    await waitFor(() =>
      expect(screen.getByTestId("approval-outcome").textContent).toBe(
        "Could not decide: the call no longer waits for a decision (decided before, or timed out)",
      ),
    );
    await new Promise((resolve) => setTimeout(resolve, 700));
    expect(historyCalls).toBe(1);
    expect(screen.queryByText("Waiting for the answer…")).toBeNull();
  });

  it("a failing ListApprovals leaves the chat as it was, and usable", async () => {
    const { onError } = panel((router) =>
      router.service(ChatService, {
        getHistory: () => ({ messages: [answer("a1", "I need your approval first.", [loggedCall("call-4", "pending")])] }),
        listApprovals: () => {
          throw new ConnectError("approvals are down", Code.Unavailable);
        },
        async *streamChat() {
          yield create(StreamChatResponseSchema, { event: { case: "started", value: { generationId: "g-2" } } });
          yield create(StreamChatResponseSchema, { event: { case: "delta", value: { content: "Still here." } } });
          yield create(StreamChatResponseSchema, {
            event: { case: "completed", value: { doneReason: DoneReason.STOP } },
          });
        },
        listModels: () => ({ models: [] }),
      }),
    );
    const [message] = await screen.findAllByTestId("history-message");
    expect(within(message!).getByText("Waiting for approval.")).toBeTruthy();
    const user = userEvent.setup();
    await user.type(screen.getByLabelText("Message"), "hello{Enter}");
    await waitFor(() => expect(screen.getByTestId("answer").getAttribute("data-status")).toBe("done"));
    expect(screen.getByTestId("answer-text").textContent).toBe("Still here.");
    expect(screen.queryByRole("alert")).toBeNull();
    expect(screen.queryAllByRole("button", { name: /Approve|Reject/ })).toEqual([]);
    expect(onError).not.toHaveBeenCalled();
  });

  it("an expired sign-in on ListApprovals goes to the sign-in handling, like the other calls", async () => {
    const { onError } = panel((router) =>
      router.service(ChatService, {
        getHistory: () => ({ messages: [] }),
        listApprovals: () => {
          throw new ConnectError("token expired", Code.Unauthenticated);
        },
        listModels: () => ({ models: [] }),
      }),
    );
    await waitFor(() => expect(onError).toHaveBeenCalledTimes(1));
    expect(ConnectError.from(onError.mock.calls[0]![0]).code).toBe(Code.Unauthenticated);
    expect(screen.getByText(/No messages yet/)).toBeTruthy();
  });

  it("switching sessions: the previous session's late ListApprovals answer is not shown", async () => {
    const s1Answer = deferred();
    const asked: string[] = [];
    const { switchTo } = panel((router) =>
      router.service(ChatService, {
        getHistory: () => ({ messages: [] }),
        async listApprovals(request) {
          asked.push(request.sessionId);
          if (request.sessionId === "s1") {
            await s1Answer.promise;
            return { approvals: [waiting("g-1", "call-5", "team-old")] };
          }
          return { approvals: [] };
        },
        listModels: () => ({ models: [] }),
      }),
    );
    await waitFor(() => expect(asked).toEqual(["s1"]));
    switchTo("s2");
    await waitFor(() => expect(asked).toEqual(["s1", "s2"]));
    await act(async () => {
      s1Answer.resolve();
      await new Promise((resolve) => setTimeout(resolve, 50));
    });
    expect(screen.queryByText("Creates the workspace team-old")).toBeNull();
    expect(screen.queryByRole("article", { name: "Waiting for your decision" })).toBeNull();
    expect(screen.queryAllByTestId("pending-call")).toEqual([]);
  });

  it("stops looking for the answer when the panel goes", async () => {
    let historyCalls = 0;
    const { view } = panel((router) =>
      router.service(ChatService, {
        getHistory: () => {
          historyCalls += 1;
          return { messages: [question] };
        },
        listApprovals: () => ({ approvals: [waiting("g-1", "call-6", "team-x")] }),
        decideToolCall: () => ({ accepted: true }),
        listModels: () => ({ models: [] }),
      }),
    );
    const user = userEvent.setup();
    await user.click(await screen.findByRole("button", { name: "Approve" }));
    await screen.findByText("Waiting for the answer…");
    view.unmount();
    await new Promise((resolve) => setTimeout(resolve, 800));
    expect(historyCalls).toBe(1);
  });
});
