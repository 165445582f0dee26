import { useEffect, useId, useMemo, useState } from "react";
import { parseTimeSeries } from "../chat/timeseries";
import { toolStatus, type Decision, type ToolActivity, type ToolApproval, type ToolStatus } from "../chat/turn";
import { TimeSeriesView } from "./TimeSeriesView";

/** The current time, ticking every second while `active`, until `until` (epoch ms) has passed. */
function useNow(active: boolean, until: number): number {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    if (!active) return;
    let timer: number | undefined;
    const tick = () => {
      const time = Date.now();
      setNow(time);
      if (time >= until) window.clearInterval(timer);
    };
    timer = window.setInterval(tick, 1000);
    tick();
    return () => window.clearInterval(timer);
  }, [active, until]);
  return now;
}

export function formatDuration(ms: number): string {
  const seconds = ms / 1000;
  return `${seconds < 10 ? seconds.toFixed(2) : seconds.toFixed(1)} s`;
}

function formatCountdown(ms: number): string {
  const total = Math.max(0, Math.ceil(ms / 1000));
  const minutes = Math.floor(total / 60);
  return `${minutes}:${String(total % 60).padStart(2, "0")}`;
}

const STATUS_LABEL: Record<ToolStatus, string> = {
  "awaiting-approval": "waiting for approval",
  running: "running",
  done: "done",
  failed: "failed",
  rejected: "rejected",
};

function outcomeText(approval: ToolApproval, expired: boolean): string {
  if (approval.deciding) return approval.deciding === "approved" ? "Approving…" : "Rejecting…";
  if (approval.failure) return `Could not decide: ${approval.failure}`;
  switch (approval.decision) {
    case "approved":
      return "Approved";
    case "rejected":
      return approval.reason ? `Rejected: ${approval.reason}` : "Rejected";
    case "expired":
      return "Expired";
    default:
      return expired ? "Expired" : "";
  }
}

function Arguments({ values, open }: { values: ToolActivity["arguments"]; open: boolean }) {
  if (!Object.keys(values).length) return null;
  return (
    <details className="tool-section" open={open}>
      <summary>Arguments</summary>
      <pre className="tool-args">{JSON.stringify(values, null, 2)}</pre>
    </details>
  );
}

/**
 * One tool call: its name, arguments, status, result and run time; a chart when the result is a
 * time series; and for a call that changes something, the approval with a countdown and
 * Approve / Reject buttons (only when `onDecide` is given, i.e. the generation is live).
 */
export function ToolCard({ tool, onDecide }: { tool: ToolActivity; onDecide?: (decision: Decision) => void }) {
  const approval = tool.approval;
  const undecided = !!approval && !approval.decision && !approval.deciding && !approval.failure;
  const deadline = approval?.deadline?.getTime();
  const now = useNow(undecided && !tool.result && deadline !== undefined, deadline ?? 0);
  const status = toolStatus(tool, now);
  const expired = undecided && status === "rejected"; // the deadline passed without a decision
  const pending = undecided && !expired && !tool.result;
  const series = useMemo(() => parseTimeSeries(tool.result?.data), [tool.result?.data]);
  const descriptionId = useId();

  return (
    <section className="tool" aria-label={`Tool call ${tool.name}`} data-testid="tool-card" data-status={status}>
      <header>
        <span className="tool-name">{tool.name}</span>
        {tool.requiresApproval ? <span className="badge">changes something</span> : null}
        <span className={`badge badge-${status.replace(" ", "-")}`} data-testid="tool-status">
          {STATUS_LABEL[status]}
        </span>
        {tool.result?.durationMs !== undefined ? (
          <span className="muted tool-duration" title="How long the tool ran">
            {formatDuration(tool.result.durationMs)}
          </span>
        ) : null}
      </header>
      {approval ? (
        <div className="approval" role="group" aria-label={`Approval for ${tool.name}`} aria-describedby={descriptionId}>
          <p id={descriptionId} className="approval-description">
            {approval.description || "This tool changes something and needs your approval."}
          </p>
          <Arguments values={tool.arguments} open />
          {pending && approval.deadline && onDecide ? (
            <p className="muted">
              Decide within{" "}
              <span role="timer" aria-live="off">
                {formatCountdown(approval.deadline.getTime() - now)}
              </span>
              , or it is rejected.
            </p>
          ) : null}
          {onDecide && !tool.result ? (
            <div className="actions">
              <button type="button" className="primary" disabled={!pending} onClick={() => onDecide("approved")}>
                Approve
              </button>
              <button type="button" disabled={!pending} onClick={() => onDecide("rejected")}>
                Reject
              </button>
            </div>
          ) : null}
          {pending && !onDecide ? <p className="muted">Waiting for approval.</p> : null}
          <p role="status" className="approval-outcome" data-testid="approval-outcome">
            {outcomeText(approval, expired)}
          </p>
        </div>
      ) : (
        <Arguments values={tool.arguments} open={false} />
      )}
      {tool.result ? (
        <details className="tool-section" open>
          <summary>{tool.result.isError ? "Error" : "Result"}</summary>
          <pre className="tool-result" tabIndex={0}>
            {tool.result.content}
          </pre>
        </details>
      ) : null}
      {series ? <TimeSeriesView series={series} /> : null}
    </section>
  );
}
