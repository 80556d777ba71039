import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { selectBackend } from '@kvpack/core';
import '@kvpack/xkv';
import '@kvpack/baselines';
import { resolveConfig } from './config.js';
import { DEFAULT_TOLERANCE, compareToBaseline, parseTolerance, readBaseline, toBaseline, writeBaseline, type Baseline } from './regression.js';
import { runBench, type BenchPrompt, type SettingResult } from './runner.js';
import { ToyModel } from './testing/toy-model.js';

const layout = { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 8 };
const ids = Array.from({ length: 40 }, (_, i) => (i * 11 + 5) % 48);
const prompts: BenchPrompt[] = [{ name: 'p', contextIds: ids.slice(0, 30), continuationIds: ids.slice(30) }];
let model: ToyModel;
let good: SettingResult[];
let baseline: Baseline;

function env() {
  return { backend: 'wasm', backendLine: 'backend wasm', node: 'v20', platform: 'linux', arch: 'x64', cpus: 2, date: '2026-01-01', kvpackVersion: '0', quick: false };
}

async function runWith(strategies: unknown[]): Promise<SettingResult[]> {
  const c = resolveConfig({ model: 'toy', prompts: [{ ids: [1, 2, 3] }], strategies }, '/tmp');
  return (await runBench(model, prompts, c.settings, { decodeTokens: 6, repeats: 1 })).results;
}

beforeAll(async () => {
  await selectBackend('wasm');
  model = new ToyModel(layout);
  good = await runWith([
    { name: 'xkv', options: { layersPerGroup: 2, rankK: 8, rankV: 8 } },
    { name: 'kivi', options: { bits: 4, quantGroupSize: 8, residualLength: 8 } },
  ]);
  baseline = toBaseline({ config: { source: 'toy.yaml', data: {} }, environment: env(), results: good }, 'toy.yaml');
});
afterAll(() => model.dispose());

describe('baseline regression check', () => {
  it('passes identical results', () => {
    const c = compareToBaseline(good, baseline);
    expect(c.regressions).toEqual([]);
    expect(c.checked).toBe(2);
    expect(c.added).toEqual([]);
  });

  it('flags a planted regression: the xkv setting silently ran at a lower rank', async () => {
    const [lowered] = await runWith([{ name: 'xkv', options: { layersPerGroup: 2, rankK: 4, rankV: 8 } }]);
    // Present it under the baseline's identity, as a code change that lowered the rank would.
    const planted = [{ ...lowered, key: good[0].key, label: good[0].label }, good[1]];
    const c = compareToBaseline(planted, baseline);
    const metrics = c.regressions.map((r) => r.metric);
    expect(metrics).toContain('bytes');
    expect(metrics).toContain('keyError');
    expect(c.regressions.every((r) => r.label === good[0].label)).toBe(true);
    const ke = c.regressions.find((r) => r.metric === 'keyError')!;
    expect(ke.current!).toBeGreaterThan(ke.baseline! * 1.05);
    expect(ke.message).toMatch(/keyError .* > baseline .* × \(1 \+ 0.05\)/);
  });

  it('applies the stated tolerances at their edges', () => {
    const b = good[0];
    const at = (over: Partial<SettingResult>) => compareToBaseline([{ ...b, ...over }], { ...baseline, results: baseline.results.slice(0, 1) }).regressions.map((r) => r.metric);
    expect(at({ keyError: b.keyError! * 1.049 })).toEqual([]);
    expect(at({ keyError: b.keyError! * 1.051 })).toEqual(['keyError']);
    expect(at({ valueError: b.valueError! * 1.06 })).toEqual(['valueError']);
    expect(at({ deltaNll: b.deltaNll + 0.019 })).toEqual([]);
    expect(at({ deltaNll: b.deltaNll + 0.021 })).toEqual(['deltaNll']);
    expect(at({ deltaNll: b.deltaNll - 1 })).toEqual([]); // improvements pass
    expect(at({ agreement: b.agreement! - 0.04 })).toEqual([]);
    expect(at({ agreement: b.agreement! - 0.06 })).toEqual(['agreement']);
    expect(at({ top1Agreement: b.top1Agreement - 0.06 })).toEqual(['top1Agreement']);
    expect(at({ bytes: b.bytes + 1 })).toEqual(['bytes']);
    expect(at({ keyError: null })).toEqual(['keyError']);
    expect(at({ error: 'boom' })).toEqual(['missing']);
    expect(compareToBaseline([], baseline).regressions.map((r) => r.metric)).toEqual(['missing', 'missing']);
  });

  it('round-trips baseline files and parses --tolerance', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-bl-'));
    const p = writeBaseline(join(dir, 'sub', 'b.json'), baseline);
    expect(readBaseline(p)).toEqual(baseline);
    expect(() => readBaseline(join(dir, 'none.json'))).toThrow(/does not exist.*--write-baseline/);
    expect(parseTolerance('deltaNll=0.05, agreement=0')).toEqual({ ...DEFAULT_TOLERANCE, deltaNll: 0.05, agreement: 0 });
    expect(() => parseTolerance('nll=1')).toThrow(/unknown name "nll"/);
    expect(() => parseTolerance('relError=-1')).toThrow(/non-negative/);
    expect(() => parseTolerance('0.05')).toThrow(/not name=value/);
  });
});
