import type { Problem } from "../api/errors";

export function ProblemNotice({
  problem,
  onSignIn,
  onDismiss,
}: {
  problem: Problem;
  onSignIn?: () => void;
  onDismiss?: () => void;
}) {
  return (
    <div className={problem.cancelled ? "notice" : "notice notice-error"} role="alert">
      <strong>{problem.title}.</strong> {problem.detail}
      {problem.signIn && onSignIn ? (
        <button type="button" className="link" onClick={onSignIn}>
          Sign in again
        </button>
      ) : null}
      {onDismiss ? (
        <button type="button" className="link" aria-label="Dismiss" onClick={onDismiss}>
          Dismiss
        </button>
      ) : null}
    </div>
  );
}
