import type { Decision, ToolActivity } from "../chat/turn";

export function ToolCard({
  tool,
  onDecide,
}: {
  tool: ToolActivity;
  onDecide?: (decision: Decision) => void;
}) {
  const approval = tool.approval;
  const waiting = approval && !approval.decision && !tool.result;
  return (
    <section className="tool" aria-label={`Tool call ${tool.name}`}>
      <header>
        <span className="tool-name">{tool.name}</span>
        {tool.requiresApproval ? <span className="badge">changes something</span> : null}
        {tool.result ? (
          <span className={tool.result.isError ? "badge badge-error" : "badge badge-ok"}>
            {tool.result.isError ? "failed" : "done"}
          </span>
        ) : null}
      </header>
      {Object.keys(tool.arguments).length ? (
        <pre className="tool-args">{JSON.stringify(tool.arguments, null, 2)}</pre>
      ) : null}
      {approval ? (
        <div className="approval">
          <p>{approval.description || "This tool changes something and needs your approval."}</p>
          {approval.deadline && waiting ? (
            <p className="muted">Decide by {approval.deadline.toLocaleTimeString()}, or it is rejected.</p>
          ) : null}
          {waiting && onDecide ? (
            <div className="actions">
              <button type="button" className="primary" onClick={() => onDecide("approved")}>
                Approve
              </button>
              <button type="button" onClick={() => onDecide("rejected")}>
                Reject
              </button>
            </div>
          ) : null}
          {approval.decision ? <p className="muted">You {approval.decision} this call.</p> : null}
        </div>
      ) : null}
      {tool.result ? <pre className="tool-result">{tool.result.content}</pre> : null}
    </section>
  );
}
