import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import type { ApprovalOutcome, ToolActivity, ToolApproval, ToolOutcome } from "./turn";

/** What an assistant message's metadata tells about how it was answered. */
export interface AnswerDetails {
  /** The tool calls, in call order, as the live stream showed them. */
  readonly tools: readonly ToolActivity[];
  /** "monitoring", "operations" or "troubleshooting" when an agent answered. */
  readonly agent?: string;
  readonly model?: string;
}

function isObject(value: JsonValue | undefined): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function text(value: JsonValue | undefined): string {
  return typeof value === "string" ? value : "";
}

const OUTCOMES: readonly string[] = ["approved", "rejected", "expired"];

function approvalFrom(value: JsonValue | undefined): ToolApproval | undefined {
  if (!isObject(value)) return undefined;
  const decision = text(value.decision); // "pending" (or anything unknown) stays undecided
  const reason = text(value.reason);
  return {
    description: text(value.description),
    ...(OUTCOMES.includes(decision) ? { decision: decision as ApprovalOutcome } : {}),
    ...(reason ? { reason } : {}),
  };
}

function resultFrom(value: JsonValue | undefined): ToolOutcome | undefined {
  if (!isObject(value)) return undefined;
  const duration = value.duration_ms;
  return {
    content: text(value.content),
    isError: value.is_error === true,
    ...(isObject(value.data) ? { data: value.data } : {}),
    ...(typeof duration === "number" && Number.isFinite(duration) ? { durationMs: duration } : {}),
  };
}

function toolFrom(value: JsonValue, index: number): ToolActivity | undefined {
  if (!isObject(value)) return undefined;
  const approval = approvalFrom(value.approval);
  const result = resultFrom(value.result);
  return {
    id: text(value.tool_call_id) || `history-tool-${index}`,
    name: text(value.name) || "tool",
    arguments: isObject(value.arguments) ? value.arguments : {},
    requiresApproval: value.requires_approval === true || approval !== undefined,
    ...(approval ? { approval } : {}),
    ...(result ? { result } : {}),
  };
}

/** Rebuilds the tool cards of a stored answer from its metadata (`tools`, `agent`, `model`). */
export function answerDetails(metadata: JsonObject | undefined): AnswerDetails {
  const tools = Array.isArray(metadata?.tools)
    ? metadata.tools.flatMap((value, index) => toolFrom(value, index) ?? [])
    : [];
  const agent = text(metadata?.agent);
  const model = text(metadata?.model);
  return { tools, ...(agent ? { agent } : {}), ...(model ? { model } : {}) };
}
