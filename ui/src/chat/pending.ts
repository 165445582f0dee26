import { MessageRole, type ChatMessage, type PendingApproval } from "@gen/opsmesh/chat/v1/chat_pb.js";
import { answerDetails } from "./history";
import { waitingTool, type Decision, type ToolActivity } from "./turn";

/**
 * A tool call of an earlier generation that waits for the user's decision (ListApprovals), e.g.
 * after a reload: its generation keeps waiting on the server until the deadline.
 *
 * - `open`: waits for the decision (or the server refused one: see the approval's failure);
 * - `answering`: the decision was taken, the answer is on its way into the history;
 * - `late`: the answer did not show up in the history while we looked.
 */
export interface PendingCall {
  readonly generationId: string;
  readonly tool: ToolActivity;
  readonly phase: "open" | "answering" | "late";
}

export function pendingCalls(approvals: readonly PendingApproval[]): PendingCall[] {
  return approvals.flatMap((pending) =>
    pending.approval && pending.approval.toolCallId
      ? [{ generationId: pending.generationId, tool: waitingTool(pending.approval), phase: "open" as const }]
      : [],
  );
}

/** The ids of the tool calls a history message's answer made. */
export function toolCallIds(message: ChatMessage): string[] {
  if (message.role !== MessageRole.ASSISTANT) return [];
  return answerDetails(message.metadata).tools.map((tool) => tool.id);
}

/**
 * The answer a decided tool call led to in a page of history (oldest first): the assistant
 * message that logs the call with a decision; else the first assistant message not in `known`.
 */
export function findAnswer(
  page: readonly ChatMessage[],
  toolCallId: string,
  known: ReadonlySet<string>,
): ChatMessage | undefined {
  const assistant = page.filter((m) => m.role === MessageRole.ASSISTANT);
  const logged = assistant.find((m) =>
    answerDetails(m.metadata).tools.some((tool) => tool.id === toolCallId && !!tool.approval?.decision),
  );
  return logged ?? assistant.find((m) => !known.has(m.id));
}

/**
 * The history with the answer in it: messages the fresh page has again are replaced by their
 * newer version, and the answer is added at the end when it is new. Other new messages (answers
 * to this page's live turns, which show as turns) are left out.
 */
export function withAnswer(history: readonly ChatMessage[], page: readonly ChatMessage[], answer: ChatMessage): ChatMessage[] {
  const fresh = new Map(page.map((m) => [m.id, m]));
  const merged = history.map((m) => fresh.get(m.id) ?? m);
  return merged.some((m) => m.id === answer.id) ? merged : [...merged, answer];
}

/** Polling for the answer: the first wait, the longest, and when to give up (ms). */
export const ANSWER_POLL = { firstMs: 500, maxMs: 4000, limitMs: 60_000 } as const;

/** The wait before the next look: doubling, up to the longest. */
export function nextDelay(delay: number): number {
  return Math.min(delay * 2, ANSWER_POLL.maxMs);
}

/** A history card's tool call, with the decision the user made here if the stored log predates it. */
export function settled(tool: ToolActivity, decision: Decision | undefined): ToolActivity {
  if (!decision || !tool.approval || tool.approval.decision) return tool;
  return { ...tool, approval: { ...tool.approval, decision } };
}
