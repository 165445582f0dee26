import type { JsonObject } from "@bufbuild/protobuf";
import { timestampDate, type Duration } from "@bufbuild/protobuf/wkt";
import { DoneReason, type ApprovalRequired, type StreamChatResponse } from "@gen/opsmesh/chat/v1/chat_pb.js";
import type { Problem } from "../api/errors";

export type Decision = "approved" | "rejected";
/** How an approval ended: the user's decision, or the deadline passing without one. */
export type ApprovalOutcome = Decision | "expired";

export interface ToolApproval {
  readonly description: string;
  readonly deadline?: Date;
  /** Set once the server accepted the decision (or, from history, as it was stored). */
  readonly decision?: ApprovalOutcome;
  /** The decision the user sent and the server has not answered yet. */
  readonly deciding?: Decision;
  /** Why the decision did not take (the server refused it, or the call failed). */
  readonly failure?: string;
  /** The reason given with a rejection (history). */
  readonly reason?: string;
}

export interface ToolOutcome {
  readonly content: string;
  readonly isError: boolean;
  /** Structured result (e.g. kind "timeseries"), when the tool has one. */
  readonly data?: JsonObject;
  /** How long the tool ran, in milliseconds. */
  readonly durationMs?: number;
}

/** A tool the agent called during a turn, with its approval and its result as they arrive. */
export interface ToolActivity {
  readonly id: string;
  readonly name: string;
  readonly arguments: JsonObject;
  readonly requiresApproval: boolean;
  readonly approval?: ToolApproval;
  readonly result?: ToolOutcome;
}

export type ToolStatus = "awaiting-approval" | "running" | "done" | "failed" | "rejected";

/** Where a tool call stands; `now` decides whether an undecided approval has expired. */
export function toolStatus(tool: ToolActivity, now: number = Date.now()): ToolStatus {
  const approval = tool.approval;
  if (approval?.decision === "rejected" || approval?.decision === "expired") return "rejected";
  const undecided = !!approval && !approval.decision;
  const expired = undecided && !approval.deciding && !!approval.deadline && now >= approval.deadline.getTime();
  // Past the deadline without a decision the server rejects the call: its error result says so.
  if (expired && (!tool.result || tool.result.isError)) return "rejected";
  if (tool.result) return tool.result.isError ? "failed" : "done";
  if (undecided) return "awaiting-approval";
  return "running";
}

export function durationMs(duration: Duration | undefined): number | undefined {
  if (!duration) return undefined;
  return Number(duration.seconds) * 1000 + duration.nanos / 1e6;
}

export type TurnStatus = "waiting" | "streaming" | "done" | "stopped" | "failed";

/** One user message and the answer streaming in for it. */
export interface Turn {
  readonly key: string;
  readonly question: string;
  readonly status: TurnStatus;
  readonly answer: string;
  readonly thinking: string;
  readonly tools: readonly ToolActivity[];
  readonly generationId?: string;
  readonly model?: string;
  /** The agent the user chose for this turn, by its label. */
  readonly agent?: string;
  readonly incomplete?: boolean;
  readonly completionTokens?: number;
  readonly problem?: Problem;
}

export function newTurn(key: string, question: string): Turn {
  return { key, question, status: "waiting", answer: "", thinking: "", tools: [] };
}

function updateTool(turn: Turn, id: string, change: (tool: ToolActivity) => ToolActivity): Turn {
  return { ...turn, tools: turn.tools.map((tool) => (tool.id === id ? change(tool) : tool)) };
}

function ensureTool(turn: Turn, tool: ToolActivity): Turn {
  return turn.tools.some((t) => t.id === tool.id) ? turn : { ...turn, tools: [...turn.tools, tool] };
}

/** The turn after one stream event (pure: React re-renders from the new object). */
export function applyEvent(turn: Turn, response: StreamChatResponse): Turn {
  const event = response.event;
  switch (event.case) {
    case "started":
      return { ...turn, status: "streaming", generationId: event.value.generationId, model: event.value.model };
    case "delta":
      return {
        ...turn,
        status: "streaming",
        answer: turn.answer + event.value.content,
        thinking: turn.thinking + event.value.thinking,
      };
    case "toolCall": {
      const call = event.value;
      return ensureTool(turn, {
        id: call.toolCallId,
        name: call.name,
        arguments: call.arguments ?? {},
        requiresApproval: call.requiresApproval,
      });
    }
    case "approvalRequired": {
      const ask = event.value;
      const withTool = ensureTool(turn, {
        id: ask.toolCallId,
        name: ask.name,
        arguments: ask.arguments ?? {},
        requiresApproval: true,
      });
      return updateTool(withTool, ask.toolCallId, (tool) => ({ ...tool, approval: askedApproval(ask) }));
    }
    case "toolResult": {
      const result = event.value;
      const withTool = ensureTool(turn, {
        id: result.toolCallId,
        name: result.name,
        arguments: {},
        requiresApproval: false,
      });
      return updateTool(withTool, result.toolCallId, (tool) => ({
        ...tool,
        result: {
          content: result.content,
          isError: result.isError,
          ...(result.data ? { data: result.data } : {}),
          ...(result.duration ? { durationMs: durationMs(result.duration) } : {}),
        },
      }));
    }
    case "completed": {
      const done = event.value;
      return {
        ...turn,
        status: done.doneReason === DoneReason.CANCELLED ? "stopped" : "done",
        incomplete: done.incomplete,
        completionTokens: done.usage?.completionTokens ?? 0,
      };
    }
    default:
      return turn; // an event kind this client does not know yet
  }
}

/** The approval a tool call waits for, as ApprovalRequired announces it (stream or ListApprovals). */
export function askedApproval(ask: ApprovalRequired): ToolApproval {
  return {
    description: ask.description,
    ...(ask.deadline ? { deadline: timestampDate(ask.deadline) } : {}),
  };
}

/** A tool call waiting for a decision, rebuilt from its ApprovalRequired (e.g. after a reload). */
export function waitingTool(ask: ApprovalRequired): ToolActivity {
  return {
    id: ask.toolCallId,
    name: ask.name || "tool",
    arguments: ask.arguments ?? {},
    requiresApproval: true,
    approval: askedApproval(ask),
  };
}

/** The user sent a decision: the card disables its buttons until the server answers. */
export function startToolDecision(tool: ToolActivity, decision: Decision): ToolActivity {
  return tool.approval ? { ...tool, approval: { ...tool.approval, deciding: decision, failure: undefined } } : tool;
}

/** The server's answer to a decision: taken, or refused with a reason. */
export function finishToolDecision(
  tool: ToolActivity,
  outcome: { decision: Decision } | { failure: string },
): ToolActivity {
  if (!tool.approval) return tool;
  const { deciding: _sent, ...approval } = tool.approval;
  return { ...tool, approval: { ...approval, ...outcome } };
}

/** The user sent a decision on a tool call: the card disables its buttons until the server answers. */
export function startDecision(turn: Turn, toolCallId: string, decision: Decision): Turn {
  return updateTool(turn, toolCallId, (tool) => startToolDecision(tool, decision));
}

/** The server's answer to a decision: taken, or refused with a reason. */
export function finishDecision(
  turn: Turn,
  toolCallId: string,
  outcome: { decision: Decision } | { failure: string },
): Turn {
  return updateTool(turn, toolCallId, (tool) => finishToolDecision(tool, outcome));
}

export function fail(turn: Turn, problem: Problem): Turn {
  return { ...turn, status: problem.cancelled ? "stopped" : "failed", problem, incomplete: true };
}
