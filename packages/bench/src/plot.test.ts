import { describe, expect, it } from 'vitest';
import { benchPanels, renderRatioPlot } from './plot.js';
import { fakeResult } from './testing/fixtures.js';

/** Line-mark groups of an SVG rendered by vega, each with its <path> elements. */
function lineGroups(svg: string): { paths: number; strokes: Set<string> }[] {
  const out: { paths: number; strokes: Set<string> }[] = [];
  const re = /<g class="mark-line role-mark[^"]*"[^>]*>(.*?)<\/g>/gs;
  for (const m of svg.matchAll(re)) {
    const paths = [...m[1].matchAll(/<path\b[^>]*>/g)];
    out.push({ paths: paths.length, strokes: new Set(paths.map((p) => /stroke="([^"]+)"/.exec(p[0])?.[1] ?? '')) });
  }
  return out;
}

describe('ratio plots', () => {
  it('draws one line per series in each panel, with the series in the legend', async () => {
    const pts = (series: string, ys: number[]) => ys.map((y, i) => ({ ratio: 2 ** (i + 1), value: y, series }));
    const svg = await renderRatioPlot(
      [
        { title: 'A', yTitle: 'ΔNLL', points: [...pts('xkv G=1', [0.1, 0.2, 0.4]), ...pts('xkv G=4', [0.05, 0.1, 0.2]), ...pts('kivi', [0.3, 0.5])] },
        { title: 'B', yTitle: 'accuracy', points: [...pts('xkv G=1', [1, 0.9]), ...pts('kivi', [0.8, 0.5])] },
      ],
      { title: 'test' },
    );
    expect(svg.startsWith('<svg')).toBe(true);
    const groups = lineGroups(svg);
    expect(groups.map((g) => g.paths)).toEqual([1, 1, 1, 1, 1]); // 3 series in panel A, 2 in panel B
    const colors = new Set(groups.flatMap((g) => [...g.strokes]));
    expect(colors.size).toBe(3); // shared color scale: one color per series across panels
    for (const s of ['xkv G=1', 'xkv G=4', 'kivi']) expect(svg).toContain(`>${s}<`);
  });

  it('gives each series its own point shape and dash, so a line lying on another stays visible', async () => {
    // Three series with identical points: only shape and dash can tell them apart.
    const pts = (series: string) => [2, 4, 8].map((ratio) => ({ ratio, value: 1 / ratio, series }));
    const svg = await renderRatioPlot([{ title: 'A', yTitle: 'err', points: [...pts('xkv G=1'), ...pts('svd'), ...pts('kivi')] }]);
    const shapeOf = new Map<string, Set<string>>();
    for (const m of svg.matchAll(/<path aria-label="[^"]*strategy: ([^;"]+);[^"]*" role="graphics-symbol" aria-roledescription="point"[^>]*\bd="([^"]+)"/g)) {
      const d = m[2].replace(/-?\d+(\.\d+)?/g, (x) => String(Math.round(Number(x)))); // shape, not position
      (shapeOf.get(m[1]) ?? shapeOf.set(m[1], new Set()).get(m[1])!).add(d);
    }
    expect([...shapeOf.keys()].sort()).toEqual(['kivi', 'svd', 'xkv G=1']);
    for (const s of shapeOf.values()) expect(s.size).toBe(1); // one shape per series
    expect(new Set([...shapeOf.values()].map((s) => [...s][0])).size).toBe(3); // three different shapes
    const dashes = lineGroups(svg).length;
    expect(dashes).toBe(3);
    const dashSet = new Set([...svg.matchAll(/<g class="mark-line[^>]*>.*?<path[^>]*stroke-dasharray="([^"]+)"/gs)].map((m) => m[1]));
    expect(dashSet.size).toBe(3);
  });

  it('bench panels skip N/A key errors and keep ΔNLL for every setting', () => {
    const panels = benchPanels([
      fakeResult({ series: 'xkv', ratio: 2 }),
      fakeResult({ series: 'xkv', ratio: 4 }),
      fakeResult({ series: 'snapkv', ratio: 4, keyError: null, valueError: null }),
    ]);
    expect(panels.map((p) => p.points.length)).toEqual([3, 2, 2]);
    expect(panels[0].points.map((p) => p.series)).toEqual(['xkv', 'xkv', 'snapkv']);
  });
});
