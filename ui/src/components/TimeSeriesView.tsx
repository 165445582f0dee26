import { Component, lazy, Suspense, useId, useState, type ReactNode } from "react";
import { describeTimeSeries, formatTime, type TimeSeries } from "../chat/timeseries";

// uPlot is only needed once a chart shows: it loads as its own chunk.
const TimeSeriesPlot = lazy(() => import("./TimeSeriesPlot"));

class ChartBoundary extends Component<{ fallback: ReactNode; children: ReactNode }, { failed: boolean }> {
  override state = { failed: false };
  static getDerivedStateFromError(): { failed: boolean } {
    return { failed: true };
  }
  override render() {
    return this.state.failed ? this.props.fallback : this.props.children;
  }
}

function DataTable({ series, id }: { series: TimeSeries; id: string }) {
  return (
    <div className="ts-table" id={id} tabIndex={0} role="region" aria-label="Chart data">
      <table>
        <caption className="sr-only">Data points of {series.query || "the chart"}</caption>
        <thead>
          <tr>
            <th scope="col">Time</th>
            {series.names.map((name, i) => (
              <th scope="col" key={i}>
                {name}
              </th>
            ))}
          </tr>
        </thead>
        <tbody>
          {series.times.map((time, row) => (
            <tr key={time}>
              <th scope="row">{formatTime(time)}</th>
              {series.values.map((values, i) => (
                <td key={i}>{values[row] ?? "—"}</td>
              ))}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

/** A time series result: the chart (role img, described in words) and its data as a table on demand. */
export function TimeSeriesView({ series }: { series: TimeSeries }) {
  const [showData, setShowData] = useState(false);
  const tableId = useId();
  const label = describeTimeSeries(series);
  const placeholder = (text: string) => (
    <div className="ts-plot ts-placeholder" role="img" aria-label={label}>
      <span className="muted" aria-hidden="true">
        {text}
      </span>
    </div>
  );
  return (
    <div className="ts">
      {series.times.length ? (
        <ChartBoundary fallback={placeholder("The chart could not be drawn; the data is below.")}>
          <Suspense fallback={placeholder("Loading chart…")}>
            <TimeSeriesPlot series={series} label={label} />
          </Suspense>
        </ChartBoundary>
      ) : (
        <p className="muted">The query returned no data points.</p>
      )}
      {series.times.length ? (
        <button
          type="button"
          className="link"
          aria-expanded={showData}
          aria-controls={showData ? tableId : undefined}
          onClick={() => setShowData((shown) => !shown)}
        >
          {showData ? "Hide data" : "Show data"}
        </button>
      ) : null}
      {showData ? <DataTable series={series} id={tableId} /> : null}
    </div>
  );
}
