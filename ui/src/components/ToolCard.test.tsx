import { act, fireEvent, render, screen, within } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import type { ToolActivity } from "../chat/turn";
import { formatDuration, ToolCard } from "./ToolCard";

const call: ToolActivity = {
  id: "c1",
  name: "prometheus_query",
  arguments: { query: "up", time: "now" },
  requiresApproval: false,
};

const card = (name = "prometheus_query") => screen.getByRole("region", { name: `Tool call ${name}` });
const status = () => screen.getByTestId("tool-status").textContent;

afterEach(() => {
  vi.useRealTimers();
});

describe("ToolCard", () => {
  it("a running call shows its name, status and its arguments as pretty JSON, collapsed", () => {
    render(<ToolCard tool={call} />);
    expect(within(card()).getByText("prometheus_query")).toBeTruthy();
    expect(status()).toBe("running");
    expect(card().getAttribute("data-status")).toBe("running");
    const args = card().querySelector("details")!;
    expect(args.open).toBe(false);
    expect(within(args).getByText("Arguments")).toBeTruthy();
    expect(args.querySelector("pre")!.textContent).toBe('{\n  "query": "up",\n  "time": "now"\n}');
    fireEvent.click(within(args).getByText("Arguments")); // the summary toggles it open
    expect(args.open).toBe(true);
  });

  it("a finished call shows done, its duration and its result in a bounded, focusable box", () => {
    render(<ToolCard tool={{ ...call, result: { content: "up{job=\"api\"} 1", isError: false, durationMs: 123.4 } }} />);
    expect(status()).toBe("done");
    expect(within(card()).getByText("0.12 s")).toBeTruthy();
    const result = within(card()).getByText('up{job="api"} 1');
    expect(result.className).toBe("tool-result");
    expect(result.getAttribute("tabindex")).toBe("0");
    expect((result.closest("details") as HTMLDetailsElement).open).toBe(true);
  });

  it("a failed call says failed and labels its output as the error", () => {
    render(<ToolCard tool={{ ...call, result: { content: "prometheus unreachable", isError: true } }} />);
    expect(status()).toBe("failed");
    expect(within(card()).getByText("Error")).toBeTruthy();
    expect(within(card()).getByText("prometheus unreachable")).toBeTruthy();
  });

  it("formats durations in seconds", () => {
    expect(formatDuration(120)).toBe("0.12 s");
    expect(formatDuration(4)).toBe("0.00 s");
    expect(formatDuration(12_345)).toBe("12.3 s");
  });

  it("an approval shows what will change, the arguments, a countdown, and Approve / Reject", () => {
    vi.useFakeTimers({ now: new Date("2030-01-01T10:00:00Z") });
    const onDecide = vi.fn();
    const tool: ToolActivity = {
      id: "c2",
      name: "provision_workspace",
      arguments: { workspace: "team-x" },
      requiresApproval: true,
      approval: { description: "Creates the namespace team-x", deadline: new Date("2030-01-01T10:01:05Z") },
    };
    render(<ToolCard tool={tool} onDecide={onDecide} />);
    const approval = screen.getByRole("group", { name: "Approval for provision_workspace" });
    expect(approval.getAttribute("aria-describedby")).toBe(screen.getByText("Creates the namespace team-x").id);
    expect((within(approval).getByText(/"workspace": "team-x"/).closest("details") as HTMLDetailsElement).open).toBe(true);
    expect(screen.getByRole("timer").textContent).toBe("1:05");
    act(() => vi.advanceTimersByTime(2000));
    expect(screen.getByRole("timer").textContent).toBe("1:03");
    expect(status()).toBe("waiting for approval");
    fireEvent.click(screen.getByRole("button", { name: "Reject" }));
    expect(onDecide).toHaveBeenCalledWith("rejected");
    fireEvent.click(screen.getByRole("button", { name: "Approve" }));
    expect(onDecide).toHaveBeenLastCalledWith("approved");
  });

  it("when the deadline passes undecided the card says Expired and the buttons stop working", () => {
    vi.useFakeTimers({ now: new Date("2030-01-01T10:00:00Z") });
    const onDecide = vi.fn();
    const tool: ToolActivity = {
      id: "c3",
      name: "deprovision_workspace",
      arguments: { workspace: "team-y" },
      requiresApproval: true,
      approval: { description: "Deletes team-y", deadline: new Date("2030-01-01T10:00:03Z") },
    };
    render(<ToolCard tool={tool} onDecide={onDecide} />);
    expect(screen.getByRole("status").textContent).toBe("");
    act(() => vi.advanceTimersByTime(3000));
    expect(screen.getByRole("status").textContent).toBe("Expired");
    expect(status()).toBe("rejected");
    expect(screen.queryByRole("timer")).toBeNull();
    const approve = screen.getByRole("button", { name: "Approve" }) as HTMLButtonElement;
    expect(approve.disabled).toBe(true);
    expect((screen.getByRole("button", { name: "Reject" }) as HTMLButtonElement).disabled).toBe(true);
    fireEvent.click(approve);
    expect(onDecide).not.toHaveBeenCalled();
  });

  it("while a decision is on its way the buttons are disabled; the outcome is announced", () => {
    const base: ToolActivity = {
      id: "c4",
      name: "provision_workspace",
      arguments: {},
      requiresApproval: true,
      approval: { description: "Creates team-z", deadline: new Date(Date.now() + 60_000) },
    };
    const { rerender } = render(<ToolCard tool={{ ...base, approval: { ...base.approval!, deciding: "approved" } }} onDecide={vi.fn()} />);
    expect((screen.getByRole("button", { name: "Approve" }) as HTMLButtonElement).disabled).toBe(true);
    expect(screen.getByRole("status").textContent).toBe("Approving…");
    rerender(<ToolCard tool={{ ...base, approval: { ...base.approval!, decision: "approved" } }} onDecide={vi.fn()} />);
    expect(screen.getByRole("status").textContent).toBe("Approved");
    expect(status()).toBe("running");
    expect((screen.getByRole("button", { name: "Reject" }) as HTMLButtonElement).disabled).toBe(true);
    rerender(<ToolCard tool={{ ...base, approval: { ...base.approval!, failure: "too late" } }} onDecide={vi.fn()} />);
    expect(screen.getByRole("status").textContent).toBe("Could not decide: too late");
    expect((screen.getByRole("button", { name: "Approve" }) as HTMLButtonElement).disabled).toBe(true);
  });

  it("a rejected call says rejected, with the reason when there is one", () => {
    render(
      <ToolCard
        tool={{
          id: "c5",
          name: "deprovision_workspace",
          arguments: { workspace: "prod" },
          requiresApproval: true,
          approval: { description: "Deletes prod", decision: "rejected", reason: "not today" },
          result: { content: "rejected by the user", isError: true },
        }}
      />,
    );
    expect(status()).toBe("rejected");
    expect(screen.getByRole("status").textContent).toBe("Rejected: not today");
  });

  it("without a live generation a pending approval just waits, without buttons", () => {
    render(
      <ToolCard
        tool={{
          id: "c6",
          name: "provision_workspace",
          arguments: { workspace: "team-x" },
          requiresApproval: true,
          approval: { description: "Creates team-x" },
        }}
      />,
    );
    expect(screen.getByText("Waiting for approval.")).toBeTruthy();
    expect(screen.queryByRole("button")).toBeNull();
    expect(status()).toBe("waiting for approval");
  });

  it("results without a time series draw no chart", () => {
    render(<ToolCard tool={{ ...call, result: { content: "3 alerts", isError: false, data: { kind: "alerts", alerts: [] } } }} />);
    expect(screen.queryByRole("img")).toBeNull();
    expect(screen.queryByRole("button", { name: "Show data" })).toBeNull();
  });
});
