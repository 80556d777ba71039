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
