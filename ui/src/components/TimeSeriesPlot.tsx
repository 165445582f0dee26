import { useEffect, useRef } from "react";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import type { TimeSeries } from "../chat/timeseries";

const HEIGHT = 240;
const FALLBACK_WIDTH = 640;
const PALETTE = [
  "#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed",
  "#0891b2", "#db2777", "#65a30d", "#ea580c", "#4f46e5",
];

function options(series: TimeSeries, width: number, color: string): uPlot.Options {
  const grid = { stroke: "rgba(127, 127, 127, 0.25)", width: 1 };
  return {
    width,
    height: HEIGHT,
    scales: { x: { time: true } },
    series: [
      { label: "Time" },
      ...series.names.map((name, i) => ({
        label: name,
        stroke: PALETTE[i % PALETTE.length],
        width: 1.5,
        spanGaps: false, // a null point is a gap in the line
        points: { show: false },
      })),
    ],
    axes: [
      { stroke: color, grid, ticks: grid },
      { stroke: color, grid, ticks: grid, size: 60 },
    ],
    legend: { show: true },
  };
}

/** The uPlot chart itself: one line per series, sized to its container (loaded lazily). */
export default function TimeSeriesPlot({ series, label }: { series: TimeSeries; label: string }) {
  const target = useRef<HTMLDivElement | null>(null);
  useEffect(() => {
    const element = target.current;
    if (!element) return;
    const width = () => Math.floor(element.clientWidth) || FALLBACK_WIDTH;
    const color = getComputedStyle(element).color || "#64748b";
    const data: uPlot.AlignedData = [
      series.times as number[],
      ...series.values.map((values) => values as (number | null)[]),
    ];
    const plot = new uPlot(options(series, width(), color), data, element);
    // Follow the container (narrow screens, a resized window): uPlot draws at a fixed size.
    const observer =
      typeof ResizeObserver === "undefined"
        ? null
        : new ResizeObserver(() => {
            const next = width();
            if (next !== plot.width) plot.setSize({ width: next, height: HEIGHT });
          });
    observer?.observe(element);
    return () => {
      observer?.disconnect();
      plot.destroy();
    };
  }, [series]);
  return <div ref={target} className="ts-plot" role="img" aria-label={label} data-testid="timeseries-chart" />;
}
