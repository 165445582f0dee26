import type { JsonObject, JsonValue } from "@bufbuild/protobuf";

/** The most the client draws, whatever a tool sends (the backend promises 20 × 300). */
export const MAX_SERIES = 20;
export const MAX_POINTS = 300;

/** A PromQL range result (`ToolResult.data` with kind "timeseries"), aligned on one time axis. */
export interface TimeSeries {
  readonly query: string;
  /** Unix seconds. */
  readonly start: number;
  readonly end: number;
  /** Seconds between points. */
  readonly step: number;
  readonly names: readonly string[];
  /** Every timestamp any series has, ascending (unix seconds). */
  readonly times: readonly number[];
  /** One array per series, aligned with `times`; null where the series has no value (a gap). */
  readonly values: readonly (readonly (number | null)[])[];
}

function finite(value: JsonValue | undefined): number | null {
  const n = typeof value === "number" ? value : typeof value === "string" && value.trim() ? Number(value) : NaN;
  return Number.isFinite(n) ? n : null;
}

function seriesName(value: JsonObject, index: number): string {
  if (typeof value.name === "string" && value.name) return value.name;
  const labels = value.labels;
  if (labels && typeof labels === "object" && !Array.isArray(labels)) {
    const pairs = Object.entries(labels).map(([k, v]) => `${k}="${String(v)}"`);
    if (pairs.length) return `{${pairs.join(", ")}}`;
  }
  return `series ${index + 1}`;
}

/** The time series in a tool result's data, or null when the data is something else. */
export function parseTimeSeries(data: JsonObject | undefined): TimeSeries | null {
  if (!data || data.kind !== "timeseries" || !Array.isArray(data.series)) return null;
  const raw = data.series
    .filter((s): s is JsonObject => typeof s === "object" && s !== null && !Array.isArray(s))
    .slice(0, MAX_SERIES);
  const names = raw.map(seriesName);
  const points = raw.map((s) => {
    const byTime = new Map<number, number | null>();
    if (Array.isArray(s.points)) {
      for (const point of s.points.slice(0, MAX_POINTS)) {
        if (!Array.isArray(point)) continue;
        const t = finite(point[0]);
        if (t !== null) byTime.set(t, finite(point[1]));
      }
    }
    return byTime;
  });
  const times = [...new Set(points.flatMap((p) => [...p.keys()]))].sort((a, b) => a - b);
  const values = points.map((p) => times.map((t) => p.get(t) ?? null));
  const start = finite(data.start) ?? times[0] ?? 0;
  const end = finite(data.end) ?? times[times.length - 1] ?? start;
  return {
    query: typeof data.query === "string" ? data.query : "",
    start,
    end,
    step: finite(data.step) ?? 0,
    names,
    times,
    values,
  };
}

export function formatTime(unixSeconds: number): string {
  return new Date(unixSeconds * 1000).toLocaleString();
}

/** The words a screen reader hears for the chart. */
export function describeTimeSeries(series: TimeSeries): string {
  const count = `${series.names.length} series`;
  const query = series.query ? ` of ${series.query}` : "";
  const range = `from ${formatTime(series.start)} to ${formatTime(series.end)}`;
  const step = series.step ? `, one point every ${series.step} s` : "";
  return `Time series chart${query}: ${count} ${range}${step}`;
}
