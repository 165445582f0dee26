import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ChatMessageSchema, MessageRole, PendingApprovalSchema } from "@gen/opsmesh/chat/v1/chat_pb.js";
import { ANSWER_POLL, findAnswer, nextDelay, pendingCalls, settled, withAnswer } from "./pending";

const msg = (id: string, role: MessageRole, tools?: { id: string; decision: string }[]) =>
  create(ChatMessageSchema, {
    id,
    role,
    content: id,
    ...(tools
      ? { metadata: { tools: tools.map((t) => ({ tool_call_id: t.id, name: "x", approval: { decision: t.decision } })) } }
      : {}),
  });

describe("pending approvals", () => {
  it("builds open calls from ListApprovals, skipping entries without an approval", () => {
    const calls = pendingCalls([
      create(PendingApprovalSchema, { generationId: "g", approval: { toolCallId: "c", name: "n", description: "d" } }),
      create(PendingApprovalSchema, { generationId: "g2" }),
    ]);
    expect(calls).toEqual([
      { generationId: "g", phase: "open", tool: expect.objectContaining({ id: "c", name: "n", approval: { description: "d" } }) },
    ]);
  });

  it("finds the answer that logs the call decided, else the first new assistant message", () => {
    const known = new Set(["u1", "a1"]);
    const still = msg("a1", MessageRole.ASSISTANT, [{ id: "c", decision: "pending" }]);
    expect(findAnswer([msg("u1", MessageRole.USER), still], "c", known)).toBeUndefined();
    const decided = msg("a1", MessageRole.ASSISTANT, [{ id: "c", decision: "approved" }]);
    expect(findAnswer([msg("u1", MessageRole.USER), decided], "c", known)).toBe(decided);
    const fresh = msg("a2", MessageRole.ASSISTANT);
    const later = msg("a3", MessageRole.ASSISTANT);
    expect(findAnswer([still, fresh, later], "c", known)).toBe(fresh);
    expect(findAnswer([still, msg("u2", MessageRole.USER)], "c", known)).toBeUndefined();
  });

  it("merges the answer: known messages updated in place, the new answer last, other new ones left out", () => {
    const history = [msg("u1", MessageRole.USER), msg("a1", MessageRole.ASSISTANT, [{ id: "c", decision: "pending" }])];
    const updated = msg("a1", MessageRole.ASSISTANT, [{ id: "c", decision: "approved" }]);
    expect(withAnswer(history, [history[0]!, updated], updated)).toEqual([history[0], updated]);
    const answer = msg("a2", MessageRole.ASSISTANT);
    const merged = withAnswer(history, [...history, msg("u9", MessageRole.USER), answer], answer);
    expect(merged.map((m) => m.id)).toEqual(["u1", "a1", "a2"]);
  });

  it("backs off from 0.5 s to at most 4 s", () => {
    const delays: number[] = [ANSWER_POLL.firstMs];
    while (delays.length < 6) delays.push(nextDelay(delays.at(-1)!));
    expect(delays).toEqual([500, 1000, 2000, 4000, 4000, 4000]);
  });

  it("shows a decision made here on a stored card that still says pending, never over a stored one", () => {
    const tool = { id: "c", name: "x", arguments: {}, requiresApproval: true, approval: { description: "" } };
    expect(settled(tool, "approved").approval?.decision).toBe("approved");
    expect(settled(tool, undefined)).toBe(tool);
    const stored = { ...tool, approval: { description: "", decision: "expired" as const } };
    expect(settled(stored, "approved")).toBe(stored);
  });
});
