import { create } from "@bufbuild/protobuf";
import { createRouterTransport } from "@connectrpc/connect";
import { render, screen, within } from "@testing-library/react";
import { describe, expect, it, vi } from "vitest";
import {
  TaskSchema,
  TaskService,
  TaskStatus,
  TaskType,
  WorkspaceAction,
} from "@gen/opsmesh/task/v1/task_pb.js";
import { createApi } from "../api/transport";
import { describeTask, TasksScreen } from "./TasksScreen";

const workspaceTask = create(TaskSchema, {
  id: "w1",
  type: TaskType.WORKSPACE,
  status: TaskStatus.SUCCEEDED,
  version: 3n,
  // The deprecated Struct says something else: the screen must not read it.
  payload: { action: "WORKSPACE_ACTION_DEPROVISION", workspace: "from-the-struct" },
  typedPayload: {
    case: "workspace",
    value: {
      action: WorkspaceAction.PROVISION,
      workspace: "team-a",
      quota: { cpu: "4", pods: 3 },
    },
  },
});

const emailTask = create(TaskSchema, {
  id: "e1",
  type: TaskType.EMAIL,
  status: TaskStatus.SUCCEEDED,
  version: 2n,
  payload: { notification_id: "from-the-struct" },
  typedPayload: { case: "email", value: { notificationId: "n-42" } },
});

describe("describeTask", () => {
  it("reads the typed payload, numbers as numbers", () => {
    expect(describeTask(workspaceTask)).toBe("provision team-a (cpu 4, 3 pods)");
    expect(describeTask(emailTask)).toBe("n-42");
  });

  it("says nothing about a task without a typed payload", () => {
    const untyped = create(TaskSchema, { type: TaskType.EMAIL, payload: { notification_id: "old" } });
    expect(describeTask(untyped)).toBe("");
  });
});

describe("TasksScreen", () => {
  it("lists tasks with what their typed payload says", async () => {
    const transport = createRouterTransport((router) => {
      router.service(TaskService, {
        listTasks: () => ({ tasks: [workspaceTask, emailTask] }),
      });
    });
    render(<TasksScreen api={createApi(transport)} onError={vi.fn()} />);
    const rows = await screen.findAllByTestId("task-row");
    expect(rows).toHaveLength(2);
    expect(within(rows[0]!).getByText("provision team-a (cpu 4, 3 pods)")).toBeTruthy();
    expect(within(rows[1]!).getByText("n-42")).toBeTruthy();
    expect(screen.queryByText(/from-the-struct/)).toBeNull();
  });
});
