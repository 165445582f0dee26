import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { StreamChatResponseSchema } from "@gen/opsmesh/chat/v1/chat_pb.js";
import { answerDetails } from "./history";
import { applyEvent, finishDecision, newTurn, startDecision, toolStatus, type ToolActivity } from "./turn";

type Event = MessageInitShape<typeof StreamChatResponseSchema>["event"];
const apply = (events: Event[]) =>
  events.reduce((turn, event) => applyEvent(turn, create(StreamChatResponseSchema, { event })), newTurn("k", "q"));

describe("tool calls in a turn", () => {
  it("a result carries its data and run time", () => {
    const turn = apply([
      { case: "toolCall", value: { toolCallId: "t", name: "q" } },
      {
        case: "toolResult",
        value: { toolCallId: "t", name: "q", content: "ok", isError: false, data: { kind: "timeseries" }, duration: durationFromMs(1500) },
      },
    ]);
    expect(turn.tools[0]?.result).toEqual({ content: "ok", isError: false, data: { kind: "timeseries" }, durationMs: 1500 });
  });

  it("approval: deciding, then the server's answer", () => {
    const deadline = new Date(Date.now() + 60_000);
    let turn = apply([
      {
        case: "approvalRequired",
        value: { toolCallId: "a", name: "provision_workspace", description: "d", deadline: timestampFromDate(deadline) },
      },
    ]);
    expect(toolStatus(turn.tools[0]!)).toBe("awaiting-approval");
    turn = startDecision(turn, "a", "approved");
    expect(turn.tools[0]?.approval?.deciding).toBe("approved");
    expect(toolStatus(turn.tools[0]!, deadline.getTime() + 1)).toBe("awaiting-approval"); // sent in time
    turn = finishDecision(turn, "a", { decision: "approved" });
    expect(turn.tools[0]?.approval).toEqual({ description: "d", deadline, decision: "approved" });
    expect(toolStatus(turn.tools[0]!)).toBe("running");
    const refused = finishDecision(startDecision(turn, "a", "rejected"), "a", { failure: "late" });
    expect(refused.tools[0]?.approval?.failure).toBe("late");
    expect(refused.tools[0]?.approval?.deciding).toBeUndefined();
  });

  it("status: done, failed, rejected, and expired even when the server's error result arrives", () => {
    const base: ToolActivity = { id: "x", name: "n", arguments: {}, requiresApproval: false };
    expect(toolStatus(base)).toBe("running");
    expect(toolStatus({ ...base, result: { content: "", isError: false } })).toBe("done");
    expect(toolStatus({ ...base, result: { content: "", isError: true } })).toBe("failed");
    const asked = { ...base, approval: { description: "", deadline: new Date(1000) } };
    expect(toolStatus(asked, 999)).toBe("awaiting-approval");
    expect(toolStatus(asked, 1000)).toBe("rejected");
    expect(toolStatus({ ...asked, result: { content: "timed out", isError: true } }, 2000)).toBe("rejected");
    expect(toolStatus({ ...asked, approval: { description: "", decision: "rejected" }, result: { content: "", isError: true } })).toBe("rejected");
  });
});

describe("answerDetails", () => {
  it("rebuilds tool activity from stored metadata and ignores what it does not know", () => {
    const details = answerDetails({
      agent: "monitoring",
      model: "m",
      tools: [
        { tool_call_id: "1", name: "list_alerts", arguments: { a: 1 }, requires_approval: false, result: { content: "c", is_error: false, duration_ms: 12 } },
        { tool_call_id: "2", name: "provision_workspace", arguments: {}, requires_approval: true, approval: { description: "d", decision: "pending" } },
        "garbage",
        { name: "no_id", approval: { description: "e", decision: "expired", reason: "" } },
      ],
    });
    expect(details.agent).toBe("monitoring");
    expect(details.model).toBe("m");
    expect(details.tools).toEqual([
      { id: "1", name: "list_alerts", arguments: { a: 1 }, requiresApproval: false, result: { content: "c", isError: false, durationMs: 12 } },
      { id: "2", name: "provision_workspace", arguments: {}, requiresApproval: true, approval: { description: "d" } },
      { id: "history-tool-3", name: "no_id", arguments: {}, requiresApproval: true, approval: { description: "e", decision: "expired" } },
    ]);
    expect(answerDetails(undefined)).toEqual({ tools: [] });
  });
});
