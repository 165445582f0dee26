import type uPlot from "uplot";

/**
 * Stands in for uPlot in jsdom (no canvas there): `vi.mock("uplot", () => import("../test/fakeUplot"))`.
 * Records what the chart was asked to draw, and its resizes.
 */
export default class FakePlot {
  static instances: FakePlot[] = [];
  readonly sizes: { width: number; height: number }[] = [];
  destroyed = false;
  width: number;
  readonly root: HTMLDivElement;

  constructor(
    readonly options: uPlot.Options,
    readonly data: uPlot.AlignedData,
    target: HTMLElement,
  ) {
    this.width = options.width;
    this.root = document.createElement("div");
    this.root.className = "uplot";
    this.root.append(document.createElement("canvas"));
    target.append(this.root);
    FakePlot.instances.push(this);
  }

  setSize(size: { width: number; height: number }) {
    this.width = size.width;
    this.sizes.push(size);
  }

  destroy() {
    this.destroyed = true;
    this.root.remove();
  }
}
