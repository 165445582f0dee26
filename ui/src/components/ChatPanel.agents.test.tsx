import { create, type JsonObject, type MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import { render, screen, waitFor, within } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { beforeEach, describe, expect, it, vi } from "vitest";
import {
  Agent,
  ChatMessageSchema,
  ChatService,
  DoneReason,
  MessageRole,
  StreamChatResponseSchema,
  type ChatMessage,
  type DecideToolCallRequest,
} from "@gen/opsmesh/chat/v1/chat_pb.js";
import { createApi } from "../api/transport";
import { deferred } from "../test/deferred";
import FakePlot from "../test/fakeUplot";
import { ChatPanel } from "./ChatPanel";

vi.mock("uplot", () => import("../test/fakeUplot"));

type Event = MessageInitShape<typeof StreamChatResponseSchema>["event"];
const event = (value: Event) => create(StreamChatResponseSchema, { event: value });

const TIMESERIES: JsonObject = {
  kind: "timeseries",
  query: 'rate(http_requests_total{job="api"}[5m])',
  start: 1_700_000_000,
  end: 1_700_000_060,
  step: 30,
  series: [
    { name: 'http_requests_total{code="200"}', labels: { code: "200" }, points: [[1_700_000_000, 3], [1_700_000_030, null], [1_700_000_060, 4]] },
    { name: 'http_requests_total{code="500"}', labels: { code: "500" }, points: [[1_700_000_000, 0.1], [1_700_000_030, 0.2], [1_700_000_060, 0.3]] },
  ],
};

/** The monitoring agent's turn, as the live stream sends it. */
async function* monitoringStream() {
  yield event({ case: "started", value: { generationId: "g-mon", model: "llama3.2:3b" } });
  yield event({ case: "toolCall", value: { toolCallId: "t1", name: "list_alerts", arguments: { state: "firing" } } });
  yield event({
    case: "toolResult",
    value: { toolCallId: "t1", name: "list_alerts", content: "HighErrorRate (critical) on api", duration: durationFromMs(120) },
  });
  yield event({
    case: "toolCall",
    value: { toolCallId: "t2", name: "prometheus_query_range", arguments: { query: TIMESERIES.query as string, range: "1m" } },
  });
  yield event({
    case: "toolResult",
    value: {
      toolCallId: "t2",
      name: "prometheus_query_range",
      content: "2 series, 3 points each",
      data: TIMESERIES,
      duration: durationFromMs(2345),
    },
  });
  yield event({ case: "delta", value: { content: "**HighErrorRate** fires on `api`:\n\n| code | rate |\n| --- | --- |\n| 500 | 0.3 |\n" } });
  yield event({ case: "completed", value: { doneReason: DoneReason.STOP } });
}

/** The same turn as GetHistory returns it after a reload. */
const monitoringHistory: ChatMessage[] = [
  create(ChatMessageSchema, {
    id: "a1",
    role: MessageRole.ASSISTANT,
    content: "**HighErrorRate** fires on `api`:\n\n| code | rate |\n| --- | --- |\n| 500 | 0.3 |\n",
    metadata: {
      model: "llama3.2:3b",
      agent: "monitoring",
      tools: [
        {
          tool_call_id: "t1",
          name: "list_alerts",
          arguments: { state: "firing" },
          requires_approval: false,
          result: { content: "HighErrorRate (critical) on api", is_error: false, duration_ms: 120 },
        },
        {
          tool_call_id: "t2",
          name: "prometheus_query_range",
          arguments: { query: TIMESERIES.query as string, range: "1m" },
          requires_approval: false,
          result: { content: "2 series, 3 points each", is_error: false, data: TIMESERIES, duration_ms: 2345 },
        },
      ],
    },
  }),
  create(ChatMessageSchema, { id: "u1", role: MessageRole.USER, content: "which alerts are firing?" }),
];

function approvalEvents(toolCallId: string): Event[] {
  return [
    { case: "started", value: { generationId: "g-ops" } },
    {
      case: "toolCall",
      value: { toolCallId, name: "provision_workspace", arguments: { workspace: "team-x" }, requiresApproval: true },
    },
    {
      case: "approvalRequired",
      value: {
        toolCallId,
        name: "provision_workspace",
        arguments: { workspace: "team-x" },
        description: "Creates the workspace team-x (namespace, quota, network policy)",
        deadline: timestampFromDate(new Date(Date.now() + 120_000)),
      },
    },
  ];
}

function panel(service: Parameters<typeof createRouterTransport>[0]) {
  const onError = vi.fn();
  render(
    <ChatPanel api={createApi(createRouterTransport(service))} auth={{ refresh: async () => {} }} sessionId="s1" onError={onError} />,
  );
  return onError;
}

const cardTexts = (root: HTMLElement) => within(root).getAllByTestId("tool-card").map((card) => card.textContent);

beforeEach(() => {
  FakePlot.instances = [];
});

describe("ChatPanel with agents", () => {
  it("approve: DecideToolCall gets the generation and call ids, the buttons wait, the card says Approved", async () => {
    const answer = deferred();
    const decisions: DecideToolCallRequest[] = [];
    const onError = panel((router) =>
      router.service(ChatService, {
        async *streamChat(request) {
          expect(request.agent).toBe(Agent.OPERATIONS);
          for (const e of approvalEvents("call-7")) yield event(e);
          await new Promise<void>((resolve) => setTimeout(resolve, 0));
          await answer.promise;
          yield event({
            case: "toolResult",
            value: { toolCallId: "call-7", name: "provision_workspace", content: "task t-42 queued", duration: durationFromMs(80) },
          });
          yield event({ case: "delta", value: { content: "Workspace **team-x** is being provisioned (task t-42)." } });
          yield event({ case: "completed", value: { doneReason: DoneReason.STOP } });
        },
        async decideToolCall(request) {
          decisions.push(request);
          await answer.promise; // the server holds its answer until the test lets it go
          return { accepted: true };
        },
        getHistory: () => ({ messages: [] }),
        listModels: () => ({ models: [] }),
      }),
    );
    const user = userEvent.setup();
    await user.selectOptions(screen.getByRole("combobox", { name: "Agent" }), "Operations");
    await user.type(screen.getByLabelText("Message"), "provision a workspace for team X{Enter}");

    const card = await screen.findByRole("region", { name: "Tool call provision_workspace" });
    expect(within(card).getByText("Creates the workspace team-x (namespace, quota, network policy)")).toBeTruthy();
    expect(within(card).getByRole("timer").textContent).toMatch(/^[12]:\d\d$/);
    await user.click(within(card).getByRole("button", { name: "Approve" }));

    expect(decisions.map((d) => [d.generationId, d.toolCallId, d.approved])).toEqual([["g-ops", "call-7", true]]);
    expect((within(card).getByRole("button", { name: "Approve" }) as HTMLButtonElement).disabled).toBe(true);
    expect((within(card).getByRole("button", { name: "Reject" }) as HTMLButtonElement).disabled).toBe(true);
    expect(within(card).getByRole("status").textContent).toBe("Approving…");

    answer.resolve();
    await waitFor(() => expect(screen.getByTestId("answer").getAttribute("data-status")).toBe("done"));
    expect(within(card).getByRole("status").textContent).toBe("Approved");
    expect(within(card).getByTestId("tool-status").textContent).toBe("done");
    expect(within(card).getByText("task t-42 queued")).toBeTruthy();
    expect(within(card).getByText("0.08 s")).toBeTruthy();
    expect(within(card).queryByRole("button", { name: "Approve" })).toBeNull();
    await waitFor(() => expect(screen.getByTestId("answer-text").querySelector("strong")?.textContent).toBe("team-x"));
    expect(screen.getByRole("heading", { name: "Assistant · Operations" })).toBeTruthy();
    expect(decisions).toHaveLength(1);
    expect(onError).not.toHaveBeenCalled();
  });

  it("reject: DecideToolCall says no, the card says Rejected and the call ends rejected", async () => {
    const decided = deferred();
    const decisions: boolean[] = [];
    panel((router) =>
      router.service(ChatService, {
        async *streamChat() {
          for (const e of approvalEvents("call-8")) yield event(e);
          await decided.promise;
          yield event({
            case: "toolResult",
            value: { toolCallId: "call-8", name: "provision_workspace", content: "The user rejected this call.", isError: true },
          });
          yield event({ case: "delta", value: { content: "Understood, nothing was changed." } });
          yield event({ case: "completed", value: { doneReason: DoneReason.STOP } });
        },
        decideToolCall(request) {
          decisions.push(request.approved);
          decided.resolve();
          return { accepted: true };
        },
        getHistory: () => ({ messages: [] }),
        listModels: () => ({ models: [] }),
      }),
    );
    const user = userEvent.setup();
    await user.type(screen.getByLabelText("Message"), "provision team-x{Enter}");
    const card = await screen.findByRole("region", { name: "Tool call provision_workspace" });
    await user.click(within(card).getByRole("button", { name: "Reject" }));
    await waitFor(() => expect(screen.getByTestId("answer").getAttribute("data-status")).toBe("done"));
    expect(decisions).toEqual([false]);
    expect(within(card).getByRole("status").textContent).toBe("Rejected");
    expect(within(card).getByTestId("tool-status").textContent).toBe("rejected");
    expect(screen.getByTestId("answer-text").textContent).toBe("Understood, nothing was changed.");
  });

  it("accepted=false: the card says it could not decide, and the buttons stay disabled", async () => {
    const onError = panel((router) =>
      router.service(ChatService, {
        async *streamChat() {
          for (const e of approvalEvents("call-9")) yield event(e);
          await new Promise(() => {}); // the generation stays live
        },
        decideToolCall: () => ({ accepted: false }),
        getHistory: () => ({ messages: [] }),
        listModels: () => ({ models: [] }),
      }),
    );
    const user = userEvent.setup();
    await user.type(screen.getByLabelText("Message"), "provision team-x{Enter}");
    const card = await screen.findByRole("region", { name: "Tool call provision_workspace" });
    await user.click(within(card).getByRole("button", { name: "Approve" }));
    await waitFor(() =>
      expect(within(card).getByRole("status").textContent).toBe(
        "Could not decide: the call no longer waits for a decision (decided before, or timed out)",
      ),
    );
    expect((within(card).getByRole("button", { name: "Approve" }) as HTMLButtonElement).disabled).toBe(true);
    expect((within(card).getByRole("button", { name: "Reject" }) as HTMLButtonElement).disabled).toBe(true);
    expect(onError).not.toHaveBeenCalled();
  });

  it("a failing DecideToolCall shows why on the card", async () => {
    panel((router) =>
      router.service(ChatService, {
        async *streamChat() {
          for (const e of approvalEvents("call-10")) yield event(e);
          await new Promise(() => {});
        },
        decideToolCall: () => {
          throw new ConnectError("approvals are down", Code.Unavailable);
        },
        getHistory: () => ({ messages: [] }),
        listModels: () => ({ models: [] }),
      }),
    );
    const user = userEvent.setup();
    await user.type(screen.getByLabelText("Message"), "provision team-x{Enter}");
    const card = await screen.findByRole("region", { name: "Tool call provision_workspace" });
    await user.click(within(card).getByRole("button", { name: "Approve" }));
    await waitFor(() => expect(within(card).getByRole("status").textContent).toMatch(/^Could not decide: .+/));
  });

  it("the monitoring turn shows tool cards, a chart and the Markdown answer; a reload shows the same", async () => {
    let history: ChatMessage[] = [];
    const service = (router: Parameters<Parameters<typeof createRouterTransport>[0]>[0]) =>
      router.service(ChatService, {
        streamChat: monitoringStream,
        getHistory: () => ({ messages: history }),
        listModels: () => ({ models: [] }),
      });
    const live = render(
      <ChatPanel api={createApi(createRouterTransport(service))} auth={{ refresh: async () => {} }} sessionId="s1" onError={vi.fn()} />,
    );
    const user = userEvent.setup();
    await user.selectOptions(screen.getByRole("combobox", { name: "Agent" }), "Monitoring");
    await user.type(screen.getByLabelText("Message"), "which alerts are firing?{Enter}");
    await waitFor(() => expect(screen.getByTestId("answer").getAttribute("data-status")).toBe("done"));

    const answer = screen.getByTestId("answer");
    expect(within(answer).getByRole("region", { name: "Tool call list_alerts" }).textContent).toContain("0.12 s");
    const range = within(answer).getByRole("region", { name: "Tool call prometheus_query_range" });
    expect(within(range).getByText("2.35 s")).toBeTruthy();
    const chart = await within(range).findByTestId("timeseries-chart"); // drawn once uPlot has loaded
    expect(within(range).getByRole("img", { name: /rate\(http_requests_total\{job="api"\}\[5m\]\): 2 series/ })).toBe(chart);
    expect(chart.querySelector("canvas")).toBeTruthy();
    expect(await within(answer).findByRole("cell", { name: "0.3" })).toBeTruthy(); // the answer's Markdown table
    // The answer text comes after the tool cards.
    const cards = within(answer).getAllByTestId("tool-card");
    const text = screen.getByTestId("answer-text");
    expect(cards[cards.length - 1]!.compareDocumentPosition(text) & Node.DOCUMENT_POSITION_FOLLOWING).toBeTruthy();
    const liveCards = cardTexts(answer);
    const liveChart = chart.getAttribute("aria-label");
    const liveAnswer = text.innerHTML;
    live.unmount();

    history = monitoringHistory;
    render(
      <ChatPanel api={createApi(createRouterTransport(service))} auth={{ refresh: async () => {} }} sessionId="s1" onError={vi.fn()} />,
    );
    const messages = await screen.findAllByTestId("history-message");
    expect(messages).toHaveLength(2);
    const stored = messages[1]!;
    expect(within(stored).getByRole("heading", { name: "Assistant · Monitoring · llama3.2:3b" })).toBeTruthy();
    expect(cardTexts(stored)).toEqual(liveCards);
    expect(within(stored).getAllByTestId("tool-card").map((c) => c.getAttribute("data-status"))).toEqual(["done", "done"]);
    const storedChart = await within(stored).findByTestId("timeseries-chart");
    expect(storedChart.getAttribute("aria-label")).toBe(liveChart);
    expect(storedChart.querySelector("canvas")).toBeTruthy();
    expect(FakePlot.instances.at(-1)!.data).toEqual(FakePlot.instances[0]!.data);
    expect(await within(stored).findByRole("cell", { name: "0.3" })).toBeTruthy();
    expect(stored.querySelector(".markdown")!.innerHTML).toBe(liveAnswer);
    await user.click(within(stored).getByRole("button", { name: "Show data" }));
    expect(within(stored).getByRole("table", { name: /^Data points of rate/ }).textContent).toContain("0.2");
  });

  it("history: a pending approval waits without buttons; a decided one shows its decision", async () => {
    panel((router) =>
      router.service(ChatService, {
        getHistory: () => ({
          messages: [
            create(ChatMessageSchema, {
              id: "a2",
              role: MessageRole.ASSISTANT,
              content: "I need your approval first.",
              incomplete: true,
              metadata: {
                agent: "operations",
                tools: [
                  {
                    tool_call_id: "p1",
                    name: "deprovision_workspace",
                    arguments: { workspace: "old" },
                    requires_approval: true,
                    approval: { description: "Deletes workspace old", decision: "rejected", reason: "still in use" },
                    result: { content: "rejected", is_error: true, duration_ms: 0 },
                  },
                  {
                    tool_call_id: "p2",
                    name: "provision_workspace",
                    arguments: { workspace: "team-x" },
                    requires_approval: true,
                    approval: { description: "Creates workspace team-x", decision: "pending" },
                  },
                  {
                    tool_call_id: "p3",
                    name: "provision_workspace",
                    arguments: { workspace: "team-y" },
                    requires_approval: true,
                    approval: { description: "Creates workspace team-y", decision: "expired" },
                  },
                ],
              },
            }),
          ],
        }),
        listModels: () => ({ models: [] }),
      }),
    );
    const [message] = await screen.findAllByTestId("history-message");
    const [rejected, pending, expired] = within(message!).getAllByTestId("tool-card");
    expect(within(rejected!).getByRole("status").textContent).toBe("Rejected: still in use");
    expect(rejected!.getAttribute("data-status")).toBe("rejected");
    expect(within(pending!).getByText("Waiting for approval.")).toBeTruthy();
    expect(pending!.getAttribute("data-status")).toBe("awaiting-approval");
    expect(within(expired!).getByRole("status").textContent).toBe("Expired");
    expect(within(message!).queryAllByRole("button")).toEqual([]);
    expect(within(message!).getByText("I need your approval first.")).toBeTruthy();
    expect(within(message!).getByText("(stopped before the end)")).toBeTruthy();
  });
});
