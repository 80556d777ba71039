import { describe, expect, it } from 'vitest';
import { markdownTable, resultsTable } from './report.js';
import { fakeResult } from './testing/fixtures.js';

describe('Markdown rendering', () => {
  it('pads columns and right-aligns numbers', () => {
    const t = markdownTable(['a', 'bb'], [['x', '1.5'], ['long|name', '10']], ['l', 'r']);
    expect(t).toBe(['| a          |  bb |', '| ---------- | --: |', '| x          | 1.5 |', '| long\\|name |  10 |'].join('\n'));
  });

  it('shows N/A for eviction errors, – for no paper ratio, none for no divergence, and errors', () => {
    const t = resultsTable([
      fakeResult(),
      fakeResult({ label: 'snapkv', keyError: null, valueError: null, paperRatio: null, firstDivergence: null, agreement: 1, deltaNll: -0.001 }),
      fakeResult({ label: 'bad', error: 'rank too large' }),
    ]).split('\n');
    expect(t).toHaveLength(5);
    const cells = (row: string) => row.split('|').slice(1, -1).map((c) => c.trim());
    expect(cells(t[0])).toEqual(['setting', 'ratio', 'cr', 'paper ratio', 'key err', 'value err', 'NLL', 'ΔNLL', 'top-1', 'greedy', 'first div', 'compress ms']);
    expect(cells(t[2])).toEqual(['xkv layersPerGroup=2', '4.00×', '0.750', '3.50×', '0.1235', '0.5000', '1.2500', '+0.0500', '0.875', '0.750', '3', '12.3']);
    expect(cells(t[3])).toEqual(['snapkv', '4.00×', '0.750', '–', 'N/A', 'N/A', '1.2500', '-0.0010', '0.875', '1.000', 'none', '12.3']);
    expect(cells(t[4]).slice(0, 2)).toEqual(['bad', 'error']);
  });

  it('adds a target column when a setting was configured by a target ratio, with cr = 1 − 1/ratio', () => {
    const t = resultsTable([fakeResult({ label: 'stacked', targetRatio: 16, ratio: 16.5 }), fakeResult({ label: 'xkv' })]).split('\n');
    const cells = (row: string) => row.split('|').slice(1, -1).map((c) => c.trim());
    expect(cells(t[0]).slice(0, 4)).toEqual(['setting', 'target', 'ratio', 'cr']);
    expect(cells(t[2]).slice(0, 4)).toEqual(['stacked', '16.00×', '16.50×', (1 - 1 / 16.5).toFixed(3)]);
    expect(cells(t[3]).slice(0, 4)).toEqual(['xkv', '–', '4.00×', '0.750']);
  });
});

describe('near-tie note', () => {
  it('names the first reference greedy step whose top-2 gap is under 0.1', async () => {
    const { nearTieNotes } = await import('./report.js');
    const ref = { prompt: 'p', contextTokens: 5, continuationTokens: 2, nll: 1, continuationArgmax: [], greedyTokens: [1, 2, 3], decodePathNllDelta: 0, greedyForwardAgreement: 1 };
    expect(nearTieNotes([{ ...ref, greedyMargins: [0.5, 0.2, 0.3] }])).toEqual([]);
    const [n] = nearTieNotes([{ ...ref, greedyMargins: [0.5, 0.05, 0.01] }]);
    expect(n).toMatch(/prompt "p": .* near-tie at step 1 \(top-2 logit gap 0\.050\)/);
  });
});
