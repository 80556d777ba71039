import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { disposeKVCache, selectBackend } from '@kvpack/core';
import '@kvpack/xkv';
import '@kvpack/baselines';
import { argmaxRow } from '../metrics.js';
import { ToyModel } from '../testing/toy-model.js';
import { resolveAccuracyConfig } from './config.js';
import type { EvalExample } from './dataset.js';
import { runAccuracy, type AccuracyRunResult } from './runner.js';

const layout = { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 8 };
const V = 48;
let model: ToyModel;

/**
 * Greedy continuation by full forward passes only (a fresh prefill over prompt + tokens so far per
 * step, no cache): independent of the compressed-cache decode path the runner uses.
 */
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

const prompt = (seed: number, len: number) => Array.from({ length: len }, (_, i) => (i * (seed + 5) + seed * 11 + ((i * i) % 7)) % V);

const settings = () =>
  resolveAccuracyConfig(
    {
      model: 'toy',
      eval: 'toy.jsonl',
      strategies: [
        { name: 'dense', options: { storage: ['float32', 'float16'] } },
        { name: 'streamingllm', options: { sinks: 2, budget: 12 } },
        { name: 'snapkv', options: { budget: 12, window: 4 } },
        { name: 'xkv', options: { layersPerGroup: 2, rankK: 100, rankV: 6 } },
      ],
    },
    '/tmp',
  ).settings;

let examples: EvalExample[];
let greedy: number[][];
let run: AccuracyRunResult;
let startTensors: number;

beforeAll(async () => {
  await selectBackend('wasm');
  model = new ToyModel(layout, V, 256, 3);
  const prompts = [prompt(1, 30), prompt(2, 26), prompt(3, 34), prompt(4, 28), prompt(5, 31)];
  greedy = [];
  for (const p of prompts) greedy.push(await greedyByForward(p, 4));
  const corrupt = (a: number[], i: number) => a.map((t, j) => (j === i ? (t + 1) % V : t));
  // Task x: right, right, wrong in the last token → 2/3. Task y: right, wrong in the first token → 1/2.
  const answers = [greedy[0], greedy[1], corrupt(greedy[2], 3), greedy[3], corrupt(greedy[4], 0)];
  const tasks = ['x', 'x', 'x', 'y', 'y'];
  examples = prompts.map((p, i) => ({ id: `toy.jsonl:${i + 1}`, task: tasks[i], line: i + 1, inputIds: p, answerIds: answers[i] }));
  startTensors = tf.memory().numTensors;
  run = await runAccuracy(model, examples, settings(), { attentionQueries: 3 });
});
afterAll(() => model.dispose());

describe('runAccuracy (toy transformer)', () => {
  it('the uncompressed reference decodes the forward-pass greedy tokens; scores are the hand-computed ones', () => {
    expect(run.reference.examples.map((e) => e.predicted)).toEqual(greedy);
    expect(run.reference.accuracy.tasks).toEqual([
      { task: 'x', correct: 2, total: 3, accuracy: 2 / 3 },
      { task: 'y', correct: 1, total: 2, accuracy: 1 / 2 },
    ]);
    expect(run.reference.accuracy.mean).toBeCloseTo(7 / 12, 12);
    // The last prompt token is decoded through the cache: T = prompt length − 1.
    expect(run.prefillTokens).toEqual(examples.map((e) => e.inputIds.length - 1));
  });

  it('dense float32 scores exactly like the reference, with zero attention-output error; float16 is ratio 1', () => {
    const [f32, f16] = run.results;
    expect(f32.label).toBe('dense storage=float32');
    expect(f32.examples.map((e) => e.predicted)).toEqual(greedy);
    expect(f32.accuracy).toEqual(run.reference.accuracy);
    expect(f32.agreement).toBe(1);
    expect(f32.ratio).toBe(0.5);
    expect(f32.attentionError).toBeLessThan(1e-6);
    expect(f16.ratio).toBe(1);
    expect(f16.attentionErrorPerLayer).toHaveLength(layout.nLayers);
  });

  it('eviction settings run (SnapKV gets the observation-window queries) and aggregate bytes over examples', () => {
    for (const r of run.results.slice(2, 4)) {
      expect(r.error).toBeUndefined();
      expect(r.examples).toHaveLength(examples.length);
      const bytes = r.examples.reduce((a, e) => a + e.bytes, 0);
      const dense = r.examples.reduce((a, e) => a + e.denseBytes, 0);
      expect(r.bytes).toBe(bytes);
      expect(r.ratio).toBe(dense / bytes);
      expect(r.ratio).toBeGreaterThan(1.5);
      expect(r.attentionError).toBeGreaterThan(0);
      const correct = r.examples.filter((e) => e.correct).length;
      expect(r.accuracy.correct).toBe(correct);
      expect(r.agreement).toBe(r.examples.filter((e, i) => JSON.stringify(e.predicted) === JSON.stringify(greedy[i])).length / examples.length);
    }
    expect(run.results[3].observationWindow).toBe(4);
    expect(run.results[2].observationWindow).toBeNull();
  });

  it('a setting the model cannot take is recorded with its error; the others still ran', () => {
    const bad = run.results[4];
    expect(bad.error).toMatch(/^toy\.jsonl:1: .*rank/i);
    expect(bad.examples).toHaveLength(0);
    expect(Number.isNaN(bad.ratio)).toBe(true);
  });

  it('leaves no tensors behind', () => {
    expect(tf.memory().numTensors).toBe(startTensors);
  });

  it('lastToken "prefill": the first answer token comes from the prefill; dense float32 still matches the forward pass', async () => {
    const r = await runAccuracy(model, examples.slice(0, 2), settings().slice(0, 1), { lastToken: 'prefill', attentionQueries: 0 });
    expect(r.prefillTokens).toEqual([30, 26]);
    expect(r.reference.examples.map((e) => e.predicted)).toEqual(greedy.slice(0, 2));
    expect(r.results[0].examples.map((e) => e.predicted)).toEqual(greedy.slice(0, 2));
    expect(r.results[0].attentionError).toBeNull();
    expect(r.attentionQueries).toBe(0);
  });

  it('stops at a stop id (kept in the prediction) and caps at maxNewTokens', async () => {
    const stop = greedy[0][1];
    const r = await runAccuracy(model, examples.slice(0, 1), [], { stopIds: [stop], attentionQueries: 0 });
    const cut = greedy[0].indexOf(stop) + 1;
    expect(r.reference.examples[0].predicted).toEqual(greedy[0].slice(0, cut));
    expect(r.reference.examples[0].correct).toBe(cut === greedy[0].length);
    const capped = await runAccuracy(model, examples.slice(0, 1), [], { maxNewTokens: 2, attentionQueries: 0 });
    expect(capped.reference.examples[0].predicted).toEqual(greedy[0].slice(0, 2));
    expect(capped.reference.examples[0].correct).toBe(false);
  });

  it('rejects examples that do not fit the model, naming the example', async () => {
    const big = { ...examples[0], inputIds: [...examples[0].inputIds.slice(0, -1), V] };
    await expect(runAccuracy(model, [big], [])).rejects.toThrow(/^toy\.jsonl:1: input_ids\[29\] = 48 is outside the model's vocabulary \[0, 48\)/);
    const long = { ...examples[0], inputIds: Array.from({ length: 254 }, (_, i) => i % V) };
    await expect(runAccuracy(model, [long], [])).rejects.toThrow(/254 prompt \+ 4 answer tokens exceed the model's 256-token context/);
  });
});

describe('report notes', () => {
  it('flags MiniCache settings that leave the lower layers exact', async () => {
    const { automaticNotes } = await import('./report.js');
    const r = (label: string, startLayer?: number) => ({ ...run.results[0], label, name: 'minicache', resolvedOptions: startLayer === undefined ? {} : { startLayer } });
    expect(automaticNotes([r('all', 0)], 12)).toEqual([]);
    const notes = automaticNotes([r('all', 0), r('default'), r('from 3', 3)], 12);
    expect(notes).toHaveLength(1);
    // Default start ⌊12/2⌋ = 6: layers 0–5 stay exact; from 3 on 12 layers: 0–2 plus the unpaired 11.
    expect(notes[0]).toMatch(/"default" \(6 of 12: 0–5\), "from 3" \(4 of 12: 0–2, 11\)\./);
    expect(notes[0]).not.toMatch(/"all"/);
  });
});
