import { describe, expect, it } from "vitest";
import { describeTimeSeries, MAX_SERIES, parseTimeSeries } from "./timeseries";

describe("parseTimeSeries", () => {
  it("aligns every series on the union of their timestamps, with nulls as gaps", () => {
    const series = parseTimeSeries({
      kind: "timeseries",
      query: "rate(http_requests_total[5m])",
      start: 1000,
      end: 1120,
      step: 60,
      series: [
        { name: 'http_requests_total{code="200"}', labels: { code: "200" }, points: [[1000, 1.5], [1060, null], [1120, 2]] },
        { labels: { code: "500" }, points: [[1060, "0.25"], [1120, "NaN"]] },
      ],
    });
    expect(series).toEqual({
      query: "rate(http_requests_total[5m])",
      start: 1000,
      end: 1120,
      step: 60,
      names: ['http_requests_total{code="200"}', '{code="500"}'],
      times: [1000, 1060, 1120],
      values: [
        [1.5, null, 2],
        [null, 0.25, null],
      ],
    });
  });

  it("is null for other kinds of data, or none", () => {
    expect(parseTimeSeries(undefined)).toBeNull();
    expect(parseTimeSeries({ kind: "alerts", series: [] })).toBeNull();
    expect(parseTimeSeries({ kind: "timeseries" })).toBeNull();
  });

  it("draws at most MAX_SERIES series", () => {
    const many = Array.from({ length: 30 }, (_, i) => ({ name: `s${i}`, points: [[1, i]] }));
    expect(parseTimeSeries({ kind: "timeseries", series: many })?.names).toHaveLength(MAX_SERIES);
  });

  it("describes the chart in words: query, series count, range", () => {
    const series = parseTimeSeries({ kind: "timeseries", query: "up", start: 0, end: 3600, step: 60, series: [{ name: "up", points: [[0, 1]] }] })!;
    const words = describeTimeSeries(series);
    expect(words).toMatch(/^Time series chart of up: 1 series from .+ to .+, one point every 60 s$/);
    expect(words).toContain(new Date(3600_000).toLocaleString());
  });
});
