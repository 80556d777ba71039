import { KvpackError } from '@kvpack/core';
import type * as vl from 'vega-lite';
import type { SettingResult } from './runner.js';

/**
 * vega and vega-lite, loaded on the first plot: they are optional peers (about 65 packages, and vega's
 * canvas module has a top-level await that `require('@kvpack/bench')` could not load), so the library
 * installs and loads without them. @throws KvpackError('unsupported') naming the install command.
 */
async function loadVega(): Promise<{ vega: typeof import('vega'); vl: typeof import('vega-lite') }> {
  try {
    const [vega, vl] = await Promise.all([import('vega'), import('vega-lite')]);
    return { vega, vl };
  } catch (e) {
    throw new KvpackError(
      'unsupported',
      `the SVG plot needs the optional peers vega and vega-lite: npm i vega@6 vega-lite@6 (or pass --no-plot); ${(e as Error).message}`,
      { cause: e },
    );
  }
}

/** Point shapes cycled over the series, so lines that overlap stay distinguishable. */
const SHAPES = ['circle', 'square', 'triangle-up', 'diamond', 'cross', 'triangle-down', 'triangle-right', 'triangle-left', 'stroke'];
/** Dash patterns cycled with a period coprime to the shapes' (no two series share both). */
const DASHES = [[1, 0], [6, 3], [2, 2], [8, 3, 2, 3]];

/** One point of a metric-vs-compression-ratio plot. */
export interface PlotPoint {
  /** Measured compression ratio (x). */
  ratio: number;
  /** Metric value (y). */
  value: number;
  /** Line (color) it belongs to, e.g. a strategy or `xkv layersPerGroup=4`. */
  series: string;
  /** Setting label (kept in the data for readers of the SVG). */
  label?: string;
}

/** One panel: a metric against the compression ratio. */
export interface PlotPanel {
  title: string;
  /** y-axis title, e.g. `ΔNLL (nats/token)` or `accuracy`. */
  yTitle: string;
  points: PlotPoint[];
  /** y scale; default linear. `symlog` keeps small differences near 0 visible beside large ones. */
  yScale?: 'linear' | 'log' | 'symlog';
}

/** Options of {@link renderRatioPlot}. */
export interface PlotOptions {
  title?: string;
  /** x-axis title. Default `compression ratio (×, measured)`. */
  xTitle?: string;
  /** Log2 x axis (default true: ratios span 0.5× … 16×). */
  logX?: boolean;
  /** Panel width / height in pixels. Default 320 × 240. */
  width?: number;
  height?: number;
}

/**
 * Renders metric-vs-compression-ratio panels side by side as an SVG string (vega-lite → vega, no
 * browser): x = measured compression ratio, y = the panel's metric, one line (color) per series —
 * the layout of the xKV paper's figures. Generic: the accuracy runner passes accuracy panels.
 * Non-finite points are dropped.
 */
export async function renderRatioPlot(panels: PlotPanel[], options: PlotOptions = {}): Promise<string> {
  const values = panels.flatMap((p, i) =>
    p.points
      .filter((pt) => Number.isFinite(pt.ratio) && Number.isFinite(pt.value) && pt.ratio > 0)
      .map((pt) => ({ panel: i, ratio: pt.ratio, value: pt.value, series: pt.series, label: pt.label ?? pt.series })),
  );
  const series = [...new Set(values.map((v) => v.series))];
  const { vega, vl: vegaLite } = await loadVega();
  const spec: vl.TopLevelSpec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    ...(options.title ? { title: { text: options.title, anchor: 'start', offset: 16 } } : {}),
    data: { values },
    hconcat: panels.map((p, i) => ({
      title: p.title,
      width: options.width ?? 320,
      height: options.height ?? 240,
      transform: [{ filter: `datum.panel === ${i}` }],
      layer: [
        {
          mark: { type: 'line', strokeWidth: 1.5, opacity: 0.85 },
          encoding: {
            strokeDash: { field: 'series', type: 'nominal', scale: { domain: series, range: series.map((_, k) => DASHES[k % DASHES.length]) }, title: 'strategy' },
          },
        },
        {
          mark: { type: 'point', filled: true, size: 48, opacity: 0.9 },
          encoding: {
            shape: { field: 'series', type: 'nominal', title: 'strategy', scale: { domain: series, range: series.map((_, k) => SHAPES[k % SHAPES.length]) } },
            tooltip: [{ field: 'label' }, { field: 'ratio', format: '.2f' }, { field: 'value', format: '.4g' }],
          },
        },
      ],
      encoding: {
        x: {
          field: 'ratio',
          type: 'quantitative',
          title: options.xTitle ?? 'compression ratio (×, measured)',
          scale: options.logX === false ? { zero: false } : { type: 'log', base: 2 },
        },
        y: { field: 'value', type: 'quantitative', title: p.yTitle, scale: p.yScale === 'log' ? { type: 'log' } : p.yScale === 'symlog' ? { type: 'symlog', constant: 0.01 } : { zero: false } },
        color: {
          field: 'series',
          type: 'nominal',
          title: 'strategy',
          scale: { domain: series, scheme: series.length <= 10 ? 'tableau10' : 'tableau20' },
          legend: { labelLimit: 360 },
        },
        order: { field: 'ratio', type: 'quantitative' },
      },
    })),
    resolve: { scale: { color: 'shared', shape: 'shared', strokeDash: 'shared' } },
  } as vl.TopLevelSpec;
  const compiled = vegaLite.compile(spec).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

/** The bench's quality-vs-ratio panels: ΔNLL, post-RoPE key error and value error against the measured ratio. */
export function benchPanels(results: SettingResult[]): PlotPanel[] {
  const pts = (f: (r: SettingResult) => number | null) =>
    results.filter((r) => f(r) !== null).map((r) => ({ ratio: r.ratio, value: f(r) as number, series: r.series, label: r.label }));
  return [
    { title: 'ΔNLL of the held-out continuation', yTitle: 'ΔNLL (nats/token, symlog)', points: pts((r) => r.deltaNll), yScale: 'symlog' },
    { title: 'key reconstruction error (post-RoPE)', yTitle: 'relative Frobenius error', points: pts((r) => r.keyError) },
    { title: 'value reconstruction error', yTitle: 'relative Frobenius error', points: pts((r) => r.valueError) },
  ];
}
