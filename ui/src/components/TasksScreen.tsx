import { useCallback, useEffect, useRef, useState, type FormEvent } from "react";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import {
  TaskStatus,
  TaskType,
  WorkspaceAction,
  type Task,
} from "@gen/opsmesh/task/v1/task_pb.js";
import type { Api } from "../api/transport";

const TERMINAL = new Set([TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED]);

export function statusLabel(status: TaskStatus): string {
  return (TaskStatus[status] ?? "UNKNOWN").toLowerCase();
}

function typeLabel(type: TaskType): string {
  return type === TaskType.WORKSPACE ? "Workspace" : type === TaskType.EMAIL ? "Email" : "Task";
}

/** What the task does, from its typed payload (Task.workspace or Task.email). */
export function describeTask(task: Task): string {
  const { typedPayload } = task;
  switch (typedPayload.case) {
    case "workspace": {
      const { action, workspace, quota } = typedPayload.value;
      const verb = action === WorkspaceAction.UNSPECIFIED ? "workspace" : (WorkspaceAction[action] ?? "workspace");
      const limits = [
        quota?.cpu ? `cpu ${quota.cpu}` : "",
        quota?.memory ? `memory ${quota.memory}` : "",
        quota?.storage ? `storage ${quota.storage}` : "",
        quota?.pods ? `${quota.pods} ${quota.pods === 1 ? "pod" : "pods"}` : "",
      ].filter(Boolean);
      return `${verb.toLowerCase()} ${workspace}${limits.length ? ` (${limits.join(", ")})` : ""}`;
    }
    case "email":
      return typedPayload.value.notificationId;
    default:
      return "";
  }
}

export function TasksScreen({ api, onError }: { api: Api; onError: (error: unknown) => void }) {
  const [tasks, setTasks] = useState<Task[]>([]);
  const [nextPage, setNextPage] = useState("");
  const [workspace, setWorkspace] = useState("");
  const watching = useRef(new Map<string, AbortController>());

  const upsert = useCallback((task: Task) => {
    setTasks((known) => {
      const index = known.findIndex((t) => t.id === task.id);
      if (index < 0) return [task, ...known];
      if (known[index]!.version > task.version) return known; // an older snapshot
      return known.map((t, i) => (i === index ? task : t));
    });
  }, []);

  /** Follows a task until it ends: WatchTask streams every change of its record. */
  const watch = useCallback(
    (task: Task) => {
      if (TERMINAL.has(task.status) || watching.current.has(task.id)) return;
      const controller = new AbortController();
      watching.current.set(task.id, controller);
      void (async () => {
        try {
          for await (const change of api.tasks.watchTask({ taskId: task.id }, { signal: controller.signal })) {
            if (change.task) upsert(change.task);
            if (change.task && TERMINAL.has(change.task.status)) break;
          }
        } catch (error) {
          if (!controller.signal.aborted) onError(error);
        } finally {
          watching.current.delete(task.id);
        }
      })();
    },
    [api, onError, upsert],
  );

  const load = useCallback(
    async (pageToken: string) => {
      try {
        const page = await api.tasks.listTasks({ pageSize: 20, pageToken });
        setTasks((known) => (pageToken ? [...known, ...page.tasks] : page.tasks));
        setNextPage(page.nextPageToken);
        page.tasks.forEach(watch);
      } catch (error) {
        onError(error);
      }
    },
    [api, onError, watch],
  );

  useEffect(() => {
    const active = watching.current;
    void load("");
    return () => {
      for (const controller of active.values()) controller.abort();
      active.clear();
    };
  }, [load]);

  const provision = async (event: FormEvent) => {
    event.preventDefault();
    try {
      const { task } = await api.tasks.publishWorkspaceTask({
        payload: { action: WorkspaceAction.PROVISION, workspace: workspace.trim() },
        idempotencyKey: crypto.randomUUID(),
      });
      if (task) {
        upsert(task);
        watch(task);
        setWorkspace("");
      }
    } catch (error) {
      onError(error);
    }
  };

  const act = async (task: Task, action: "cancel" | "retry") => {
    try {
      const reply =
        action === "cancel"
          ? await api.tasks.cancelTask({ taskId: task.id })
          : await api.tasks.retryTask({ taskId: task.id });
      if (reply.task) {
        upsert(reply.task);
        watch(reply.task);
      }
    } catch (error) {
      onError(error);
    }
  };

  return (
    <section className="tasks" aria-label="Tasks">
      <h1>Tasks</h1>
      <form className="inline-form" onSubmit={(e) => void provision(e)}>
        <label htmlFor="workspace">New workspace</label>
        <input
          id="workspace"
          value={workspace}
          pattern="[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?"
          title="lowercase letters, digits and '-', 1 to 40 characters"
          placeholder="team-sandbox"
          onChange={(e) => setWorkspace(e.target.value)}
          required
        />
        <button type="submit" className="primary">
          Provision
        </button>
      </form>
      {tasks.length === 0 ? <p className="muted">No tasks yet.</p> : null}
      <table>
        <thead>
          <tr>
            <th scope="col">Task</th>
            <th scope="col">What</th>
            <th scope="col">Status</th>
            <th scope="col">Attempts</th>
            <th scope="col">Updated</th>
            <th scope="col">
              <span className="sr-only">Actions</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {tasks.map((task) => (
            <tr key={task.id} data-testid="task-row">
              <td>{typeLabel(task.type)}</td>
              <td>
                {describeTask(task)}
                {task.progress?.step ? <div className="muted">{task.progress.step}</div> : null}
                {task.error ? <div className="error-text">{task.error}</div> : null}
              </td>
              <td>
                <span className={`status status-${statusLabel(task.status)}`} data-testid="task-status">
                  {statusLabel(task.status)}
                </span>
              </td>
              <td>
                {task.retryCount + (task.status === TaskStatus.PENDING ? 0 : 1)} / {task.maxAttempts || "—"}
              </td>
              <td>{task.updatedAt ? timestampDate(task.updatedAt).toLocaleTimeString() : ""}</td>
              <td>
                {!TERMINAL.has(task.status) && !task.cancelRequested ? (
                  <button type="button" onClick={() => void act(task, "cancel")}>
                    Cancel
                  </button>
                ) : null}
                {task.status === TaskStatus.FAILED ? (
                  <button type="button" onClick={() => void act(task, "retry")}>
                    Retry
                  </button>
                ) : null}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {nextPage ? (
        <button type="button" className="link" onClick={() => void load(nextPage)}>
          More tasks
        </button>
      ) : null}
    </section>
  );
}
