import { render, screen, within } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { beforeEach, describe, expect, it, vi } from "vitest";
import { parseTimeSeries } from "../chat/timeseries";
import FakePlot from "../test/fakeUplot";
import { TimeSeriesView } from "./TimeSeriesView";

vi.mock("uplot", () => import("../test/fakeUplot"));

const series = parseTimeSeries({
  kind: "timeseries",
  query: "sum by (code) (rate(http_requests_total[5m]))",
  start: 1_700_000_000,
  end: 1_700_000_120,
  step: 60,
  series: [
    { name: '{code="200"}', points: [[1_700_000_000, 12.5], [1_700_000_060, null], [1_700_000_120, 14]] },
    { name: '{code="500"}', points: [[1_700_000_000, 0.5], [1_700_000_060, 0.75], [1_700_000_120, 1]] },
  ],
})!;

beforeEach(() => {
  FakePlot.instances = [];
});

describe("TimeSeriesView", () => {
  it("draws one line per series, nulls as gaps, in an img described by query, count and range", async () => {
    render(<TimeSeriesView series={series} />);
    const chart = await screen.findByTestId("timeseries-chart");
    expect(chart.getAttribute("role")).toBe("img");
    const label = chart.getAttribute("aria-label")!;
    expect(label).toContain("sum by (code) (rate(http_requests_total[5m]))");
    expect(label).toContain("2 series");
    expect(label).toContain(new Date(1_700_000_000_000).toLocaleString());
    expect(screen.getByRole("img", { name: label })).toBe(chart);
    expect(chart.querySelector("canvas")).toBeTruthy();

    const [plot] = FakePlot.instances;
    expect(plot).toBeDefined();
    expect(plot!.data).toEqual([
      [1_700_000_000, 1_700_000_060, 1_700_000_120],
      [12.5, null, 14],
      [0.5, 0.75, 1],
    ]);
    const lines = plot!.options.series.slice(1);
    expect(lines.map((s) => s.label)).toEqual(['{code="200"}', '{code="500"}']);
    expect(lines.every((s) => s.spanGaps === false)).toBe(true);
    expect(plot!.options.scales?.x?.time).toBe(true);
    expect(plot!.options.legend?.show).toBe(true);
  });

  it("follows its container's width, and lets go of uPlot when it goes", async () => {
    let onResize: ResizeObserverCallback = () => {};
    const observed: Element[] = [];
    vi.stubGlobal(
      "ResizeObserver",
      class {
        constructor(callback: ResizeObserverCallback) {
          onResize = callback;
        }
        observe(element: Element) {
          observed.push(element);
        }
        disconnect() {}
      },
    );
    const width = vi.spyOn(HTMLElement.prototype, "clientWidth", "get").mockReturnValue(800);
    const { unmount } = render(<TimeSeriesView series={series} />);
    const chart = await screen.findByTestId("timeseries-chart");
    const plot = FakePlot.instances[0]!;
    expect(plot.options.width).toBe(800);
    expect(observed).toEqual([chart]);
    width.mockReturnValue(320); // a phone, or a narrowed window
    onResize([], {} as ResizeObserver);
    expect(plot.sizes).toEqual([{ width: 320, height: 240 }]);
    unmount();
    expect(plot.destroyed).toBe(true);
    vi.unstubAllGlobals();
  });

  it("Show data lists every point in a table, gaps included", async () => {
    const user = userEvent.setup();
    render(<TimeSeriesView series={series} />);
    await screen.findByTestId("timeseries-chart");
    expect(screen.queryByRole("table")).toBeNull();
    const toggle = screen.getByRole("button", { name: "Show data" });
    expect(toggle.getAttribute("aria-expanded")).toBe("false");
    await user.click(toggle);
    expect(toggle.getAttribute("aria-expanded")).toBe("true");
    expect(toggle.textContent).toBe("Hide data");
    const table = screen.getByRole("table", { name: `Data points of ${series.query}` });
    expect(toggle.getAttribute("aria-controls")).toBe(table.parentElement!.id);
    expect(within(table).getAllByRole("columnheader").map((h) => h.textContent)).toEqual([
      "Time",
      '{code="200"}',
      '{code="500"}',
    ]);
    const rows = within(table).getAllByRole("row").slice(1);
    expect(rows.map((row) => [...row.querySelectorAll("td")].map((td) => td.textContent))).toEqual([
      ["12.5", "0.5"],
      ["—", "0.75"],
      ["14", "1"],
    ]);
    expect(within(rows[0]!).getByRole("rowheader").textContent).toBe(new Date(1_700_000_000_000).toLocaleString());
    await user.click(toggle);
    expect(screen.queryByRole("table")).toBeNull();
  });

  it("says so instead of drawing an empty chart", () => {
    render(<TimeSeriesView series={{ ...series, times: [], values: [[], []] }} />);
    expect(screen.getByText("The query returned no data points.")).toBeTruthy();
    expect(screen.queryByRole("img")).toBeNull();
  });
});
