import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, denseCacheBytes, disposeKVCache, selectBackend } from '@kvpack/core';
import '@kvpack/xkv';
import '@kvpack/baselines';
import { argmaxRow } from '../metrics.js';
import { ToyModel } from '../testing/toy-model.js';
import { resolveAccuracyConfig } from './config.js';
import { parseEvalJsonl, type EvalExample } from './dataset.js';
import {
  LEADERBOARD_RATIOS,
  methodName,
  ratioColumn,
  ratioOfRemovedFraction,
  readLeaderboardRun,
  removedFraction,
  summarizeLeaderboardDir,
  writeLeaderboard,
  type LeaderboardSummary,
} from './leaderboard.js';
import { runAccuracy, type AccuracyRunResult } from './runner.js';
import { runCli } from '../program.js';

const layout = { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 8 };
const V = 48;
let model: ToyModel;

/** Greedy continuation by full forward passes only (no cache): the oracle of every decode path. */
async function greedyByForward(prompt: number[], n: number): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const { logits, cache } = await model.prefill([...prompt, ...out]);
    disposeKVCache(cache);
    const d = (await logits.data()) as Float32Array;
    logits.dispose();
    out.push(argmaxRow(d, V, d.length / V - 1));
  }
  return out;
}

const word = (id: number) => `w${id}`;
const decode = (ids: number[]) => ids.map(word).join(' ');
const tok = { bosId: 1, encode: (t: string) => t.split(/\s+/).filter(Boolean).map((w) => Number(w.slice(1))), decode };
// Separator "w40 w41" opens each question; the context never holds it.
const SEP = [40, 41];
const context = (seed: number, len: number) => Array.from({ length: len }, (_, i) => (i * (seed + 5) + seed * 11 + ((i * i) % 7)) % 40);
const question = (seed: number) => [...SEP, (seed * 7) % 40, 42 + (seed % 5)];

const settings = () =>
  resolveAccuracyConfig(
    {
      model: 'toy',
      eval: 'toy.jsonl',
      strategies: [
        { name: 'dense', options: { storage: 'float32' } },
        { name: 'streamingllm', options: { sinks: 2, budget: 8 } },
        { name: 'snapkv', options: { budget: 8, window: 2 } },
      ],
    },
    '/tmp',
  ).settings;

let examples: EvalExample[];
let oracle: number[][];
const runs: Record<'agnostic' | 'aware', AccuracyRunResult> = {} as never;
let startTensors: number;

beforeAll(async () => {
  await selectBackend('wasm');
  model = new ToyModel(layout, V, 256, 5);
  const prompts = [1, 2, 3, 4].map((s) => [...context(s, 24 + s), ...question(s)]);
  oracle = [];
  for (const p of prompts) oracle.push(await greedyByForward(p, 3));
  // Answers: the oracle for prompts 1, 2, 4; prompt 3 wrong in its last token (3/4 for the reference).
  const lines = prompts.map((p, i) =>
    JSON.stringify({ task: i < 2 ? 'a' : 'b', input: decode(p), answer: decode(i === 2 ? oracle[i].map((t, j) => (j === 2 ? (t + 1) % V : t)) : oracle[i]) }),
  );
  examples = parseEvalJsonl(lines.join('\n'), 'toy.jsonl', { tokenizer: tok, question: { separator: decode(SEP) } }).examples;
  startTensors = tf.memory().numTensors;
  for (const mode of ['agnostic', 'aware'] as const) runs[mode] = await runAccuracy(model, examples, settings(), { attentionQueries: 0, queryMode: mode });
});
afterAll(() => model.dispose());

describe('context and question (query-agnostic and query-aware runs)', () => {
  it('the separator splits each prompt where its question starts', () => {
    expect(examples.map((e) => e.contextTokens)).toEqual([25, 26, 27, 28]);
    for (const e of examples) expect(e.inputIds.slice(e.contextTokens!, e.contextTokens! + 2)).toEqual(SEP);
  });

  it('query-agnostic compresses only the context; the question read through the exact cache gives the forward-pass answer', () => {
    const a = runs.agnostic;
    expect(a.prefillTokens).toEqual([25, 26, 27, 28]);
    expect(a.reference.examples.map((e) => e.predicted)).toEqual(oracle);
    expect(a.results[0].examples.map((e) => e.predicted)).toEqual(oracle);
    expect(a.reference.accuracy.tasks).toEqual([
      { task: 'a', correct: 2, total: 2, accuracy: 1 },
      { task: 'b', correct: 1, total: 2, accuracy: 0.5 },
    ]);
    // StreamingLLM keeps sinks + recent of the context only: 8 of T tokens, fp16.
    const s = a.results[1];
    expect(s.examples.map((e) => e.tokens)).toEqual([25, 26, 27, 28]);
    for (const e of s.examples) expect(e.denseBytes).toBe(denseCacheBytes(layout, e.tokens));
  });

  it('query-aware compresses the whole prompt but its last token; SnapKV votes with the question there', async () => {
    const w = runs.aware;
    expect(w.prefillTokens).toEqual(examples.map((e) => e.inputIds.length - 1));
    expect(w.reference.examples.map((e) => e.predicted)).toEqual(oracle);
    // SnapKV's bytes in each mode: those of a direct compress of that mode's prefill.
    const snap = createStrategy({ name: 'snapkv', options: { budget: 8, window: 2 } });
    for (const [mode, T] of [
      ['agnostic', examples[0].contextTokens!],
      ['aware', examples[0].inputIds.length - 1],
    ] as const) {
      const r = await model.prefill(examples[0].inputIds.slice(0, T), { observationWindow: 2 });
      r.logits.dispose();
      const c = await snap.compress(r.cache);
      expect(runs[mode].results[2].examples[0].bytes).toBe(c.byteSize());
      c.dispose();
      disposeKVCache(r.cache);
    }
  });

  it('query-agnostic without a split: a clear error', async () => {
    const bare = { ...examples[0], contextTokens: undefined };
    await expect(runAccuracy(model, [bare], [], { queryMode: 'agnostic' })).rejects.toThrow(/toy\.jsonl:1: query-agnostic runs need a context\/question split/);
  });

  it('leaves no tensors behind', () => {
    expect(tf.memory().numTensors).toBe(startTensors);
  });
});

describe("kvpress's leaderboard layout", () => {
  let root: string;
  let summary: LeaderboardSummary;
  beforeAll(() => {
    root = mkdtempSync(join(tmpdir(), 'kvpack-lb-'));
    summary = writeLeaderboard(root, {
      dataset: 'ruler',
      dataDir: '32',
      model: 'org/toy',
      examples,
      available: 10,
      decode,
      evalPath: '/x/toy.jsonl',
      backend: 'wasm',
      modes: (['agnostic', 'aware'] as const).map((m) => ({ queryMode: m, reference: runs[m].reference, results: runs[m].results })),
    });
  });

  it('ratios both ways: 2× ↔ 0.5, 8× ↔ 0.875; columns within 2^±0.25', () => {
    expect(LEADERBOARD_RATIOS.map(removedFraction)).toEqual([0.5, 0.75, 0.875, 0.9375, 0.96875]);
    expect([0.5, 0.875, 0].map(ratioOfRemovedFraction)).toEqual([2, 8, 1]);
    expect(() => ratioOfRemovedFraction(1)).toThrow(/\[0, 1\), got 1/);
    expect([15.6, 3.4, 3.3, 38, 39, 1].map(ratioColumn)).toEqual([16, 4, null, 32, null, null]);
    expect(methodName('xkv layersPerGroup=4')).toBe('xkv_layersPerGroup=4');
  });

  it('one folder per run, named dataset__data_dir__model__method__compression_ratio[__query_aware]', () => {
    const dirs = readdirSync(root).filter((d) => !d.startsWith('leaderboard')).sort();
    const cr = (mode: 'agnostic' | 'aware', i: number) => (1 - runs[mode].results[i].bytes / runs[mode].results[i].denseBytes).toFixed(2);
    const expected = (['agnostic', 'aware'] as const).flatMap((m) => {
      const q = m === 'aware' ? '__query_aware' : '';
      return [
        `ruler__32__org--toy__no_press__0.00${q}`,
        `ruler__32__org--toy__dense__${cr(m, 0)}${q}`,
        `ruler__32__org--toy__streamingllm__${cr(m, 1)}${q}`,
        `ruler__32__org--toy__snapkv__${cr(m, 2)}${q}`,
      ];
    });
    expect(dirs).toEqual(expected.sort());
    expect(cr('agnostic', 0)).toBe('-1.00'); // dense float32 holds twice the fp16 bytes
    for (const d of dirs) for (const f of ['config.yaml', 'metrics.json', 'predictions.csv']) expect(existsSync(join(root, d, f))).toBe(true);
    expect(summary.rows).toHaveLength(8);
  });

  it('each folder reads back (yaml, CSV, zod) to the values of the run', () => {
    for (const mode of ['agnostic', 'aware'] as const) {
      for (const [i, r] of runs[mode].results.entries()) {
        const row = summary.rows.find((x) => x.queryAware === (mode === 'aware') && x.label === r.label)!;
        const back = readLeaderboardRun(join(root, row.folder));
        expect(back.config).toMatchObject({
          dataset: 'ruler',
          data_dir: '32',
          model: 'org/toy',
          press_name: ['dense', 'streamingllm', 'snapkv'][i],
          query_aware: mode === 'aware',
          fraction: 0.4,
          compression_ratio: 1 - r.bytes / r.denseBytes,
        });
        expect(back.config.kvpack).toMatchObject({ ratio: r.denseBytes / r.bytes, bytes: r.bytes, dense_bytes: r.denseBytes, examples: 4, strategy: { name: r.name, options: r.resolvedOptions } });
        // Percent scores per task, recomputed from the outcomes.
        for (const t of ['a', 'b']) {
          const of = r.examples.filter((e) => e.task === t);
          const pct = (of.filter((e) => e.correct).length / of.length) * 100;
          expect(back.metrics[t]).toEqual({ string_match: pct, exact_match: pct });
        }
        expect(back.predictions).toHaveLength(4);
        for (const [k, p] of back.predictions.entries()) {
          const e = r.examples[k];
          const ex = examples[k];
          expect(p).toEqual({
            example: ex.id,
            task: ex.task,
            question: decode(ex.inputIds.slice(ex.contextTokens)),
            answer: ex.answer,
            predicted_answer: decode(e.predicted),
            correct: e.correct ? 'True' : 'False',
            compression_ratio: 1 - e.bytes / e.denseBytes,
            context_length: mode === 'aware' ? ex.inputIds.length - 1 : ex.contextTokens,
            bytes: e.bytes,
          });
        }
      }
    }
    const ref = readLeaderboardRun(join(root, 'ruler__32__org--toy__no_press__0.00'));
    expect(ref.metrics).toEqual({ a: { string_match: 100, exact_match: 100 }, b: { string_match: 50, exact_match: 50 } });
    expect(ref.config.compression_ratio).toBe(0);
  });

  it('the summary: average score per method and mode, the best per column, a Markdown table', () => {
    const json = JSON.parse(readFileSync(join(root, 'leaderboard.json'), 'utf8')) as LeaderboardSummary;
    expect(json).toEqual(JSON.parse(JSON.stringify(summary)));
    for (const row of summary.rows) expect(row.score).toBeCloseTo((row.tasks.a.string_match + row.tasks.b.string_match) / 2, 12);
    for (const b of summary.best) {
      const at = summary.rows.filter((r) => r.queryAware === b.queryAware && r.column === b.ratio);
      expect(b.score).toBe(Math.max(...at.map((r) => r.score)));
    }
    const md = readFileSync(join(root, 'leaderboard.md'), 'utf8');
    expect(md).toMatch(/### query-agnostic/);
    expect(md).toMatch(/\| method +\| +2× \(0\.5\) \| +4× \(0\.75\) \| +8× \(0\.875\) \| +16× \(0\.938\) \| +32× \(0\.969\) \| other ratios \|/);
  });

  it('the folders alone give the same summary back (kvpack bench leaderboard DIR), with its plot', async () => {
    const again = summarizeLeaderboardDir(root);
    const byFolder = (x: LeaderboardSummary) => [...x.rows].sort((a, b) => a.folder.localeCompare(b.folder));
    expect(byFolder(again)).toEqual(byFolder(summary));
    expect(again.best).toEqual(summary.best);
    const io = { stdout: '', stderr: '', out: (t: string) => void (io.stdout += `${t}\n`), err: (t: string) => void (io.stderr += `${t}\n`) };
    expect(await runCli(['bench', 'leaderboard', root], io)).toBe(0);
    expect(io.stdout).toContain('### query-aware');
    expect(readFileSync(join(root, 'leaderboard.svg'), 'utf8')).toMatch(/^<svg[\s\S]*query-agnostic[\s\S]*average score/);
    expect(await runCli(['bench', 'leaderboard', join(root, 'absent')], io)).toBe(2);
    expect(io.stderr).toMatch(/absent does not exist/);
  });

  it('a second write of the same run goes into a numbered folder inside it (as kvpress does); a corrupt file is named', () => {
    const one = { queryMode: 'aware' as const, reference: runs.aware.reference, results: [] };
    const s = writeLeaderboard(root, { dataset: 'ruler', dataDir: '32', model: 'org/toy', examples, available: 4, evalPath: 'e', backend: 'wasm', modes: [one] });
    expect(s.rows[0].folder).toBe(join('ruler__32__org--toy__no_press__0.00__query_aware', '1'));
    const dir = join(root, s.rows[0].folder);
    writeFileSync(join(dir, 'metrics.json'), '{"a": {"string_match": "high"}}');
    expect(() => readLeaderboardRun(dir)).toThrow(/metrics\.json: a\.string_match: /);
    expect(() => readLeaderboardRun(join(root, 'absent'))).toThrow(/cannot read config\.yaml/);
  });
});
