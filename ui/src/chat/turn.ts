import type { JsonObject } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { DoneReason, type StreamChatResponse } from "@gen/opsmesh/chat/v1/chat_pb.js";
import type { Problem } from "../api/errors";

export type Decision = "approved" | "rejected";

/** A tool the agent called during a turn, with its approval and its result as they arrive. */
export interface ToolActivity {
  readonly id: string;
  readonly name: string;
  readonly arguments: JsonObject;
  readonly requiresApproval: boolean;
  readonly approval?: {
    readonly description: string;
    readonly deadline?: Date;
    readonly decision?: Decision;
  };
  readonly result?: { readonly content: string; readonly isError: boolean };
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
      return updateTool(withTool, ask.toolCallId, (tool) => ({
        ...tool,
        approval: {
          description: ask.description,
          ...(ask.deadline ? { deadline: timestampDate(ask.deadline) } : {}),
        },
      }));
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
        result: { content: result.content, isError: result.isError },
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

/** The user's decision on a tool call, shown at once (the server confirms via the stream). */
export function decide(turn: Turn, toolCallId: string, decision: Decision): Turn {
  return updateTool(turn, toolCallId, (tool) =>
    tool.approval ? { ...tool, approval: { ...tool.approval, decision } } : tool,
  );
}

export function fail(turn: Turn, problem: Problem): Turn {
  return { ...turn, status: problem.cancelled ? "stopped" : "failed", problem, incomplete: true };
}
