import { readFileSync } from 'node:fs';
import * as tf from '@tensorflow/tfjs-core';
import { selectBackend } from '@kvpack/core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadLlama2cCheckpoint } from '../llama2c/index.js';
import { LlamaModel } from './llama.js';
import { HAVE_STORIES, SKIP_STORIES, STORIES_BIN, readOracle, readStoriesRef, refForward, refRope, type RefModel } from './reference.testutil.js';

/**
 * Float64 KVzip scores, from the method's description: the float64 forward over context ++ R (which
 * is what reading R through the context's cache computes), then for each layer, KV head and chunk
 * token the largest softmax weight any repeated token's query head of the group gives it, the
 * softmax over the keys [first min(nSink, s) tokens, the chunk, R up to the query] only.
 */
function refScores(m: RefModel, ctx: number[], prompt: number[], chunk: number, nSink: number): number[][][] {
  const T = ctx.length;
  const d = m.dim / m.nHeads;
  const g = m.nHeads / m.nKvHeads;
  const out = m.layers.map(() => Array.from({ length: T }, () => new Array(m.nKvHeads).fill(0))); // [L][T][H_kv]
  for (let s = 0; s < T; s += chunk) {
    const e = Math.min(T, s + chunk);
    const rep = [...prompt, ...(s > 0 ? ctx.slice(Math.max(0, s - 8), s) : []), ...ctx.slice(s, e)];
    const tr = refForward(m, [...ctx, ...rep]);
    for (let l = 0; l < m.nLayers; l++) {
      const kRot = tr.keys[l].map((k, t) => refRope(k, m.nKvHeads, d, t, m.theta, m.ropeLayout));
      for (let p = T; p < T + rep.length; p++) {
        const visible = [...Array.from({ length: Math.min(nSink, s) }, (_, i) => i), ...Array.from({ length: e - s }, (_, i) => s + i), ...Array.from({ length: p - T + 1 }, (_, i) => T + i)];
        for (let a = 0; a < m.nHeads; a++) {
          const h = Math.floor(a / g);
          const logits = visible.map((t) => {
            let dot = 0;
            for (let i = 0; i < d; i++) dot += tr.queries[l][p][a * d + i] * kRot[t][h * d + i];
            return dot / Math.sqrt(d);
          });
          const mx = Math.max(...logits);
          const z = logits.reduce((acc, x) => acc + Math.exp(x - mx), 0);
          visible.forEach((t, j) => {
            if (t >= s && t < e) out[l][t][h] = Math.max(out[l][t][h], Math.exp(logits[j] - mx) / z);
          });
        }
      }
    }
  }
  return out;
}

describe.skipIf(!HAVE_STORIES)(`context-reconstruction scores on stories260K${SKIP_STORIES}`, () => {
  let model: LlamaModel;
  let ref: RefModel;
  let ids: number[];
  beforeAll(async () => {
    await selectBackend('wasm');
    model = new LlamaModel(await loadLlama2cCheckpoint(STORIES_BIN));
    ref = readStoriesRef(readFileSync(STORIES_BIN));
    ids = readOracle().greedy_ids;
  });
  afterAll(() => model?.dispose());

  for (const [what, chunk, nSink, prompt] of [
    ['one chunk, after an instruction', 64, 4, [1, 334, 41, 279, 29, 5]],
    ['chunks of 10 tokens with 2 sinks, no instruction', 10, 2, []],
  ] as const)
    it(`${what}: the attention maxima equal a float64 re-computation`, async () => {
      const ctx = ids.slice(0, 26);
      const n0 = tf.memory().numTensors;
      const pre = await model.prefill(ctx, { logits: 'last' });
      pre.logits.dispose();
      const got = model.reconstructionScores(pre.cache, ctx, [...prompt], { chunkSize: chunk, nSink });
      const want = refScores(ref, ctx, [...prompt], chunk, nSink);
      expect(got.length).toBe(ref.nLayers);
      let spread = 0;
      for (let l = 0; l < ref.nLayers; l++) {
        expect(got[l].shape).toEqual([ctx.length, ref.nKvHeads]);
        const data = got[l].dataSync();
        for (let t = 0; t < ctx.length; t++)
          for (let h = 0; h < ref.nKvHeads; h++) {
            expect(Math.abs(data[t * ref.nKvHeads + h] - want[l][t][h]), `layer ${l} token ${t} head ${h}`).toBeLessThan(2e-5);
            spread = Math.max(spread, want[l][t][h]);
          }
      }
      expect(spread).toBeGreaterThan(0.05); // real attention, not all zeros
      tf.dispose(got);
      tf.dispose([...pre.cache.keys, ...pre.cache.values]);
      expect(tf.memory().numTensors).toBe(n0);
    });

  it('refuses a pass that would run past max_seq_len', async () => {
    const ctx = ids.slice(0, 8);
    const pre = await model.prefill(ctx, { logits: 'last' });
    pre.logits.dispose();
    expect(() => model.reconstructionScores(pre.cache, ctx, new Array(ref.maxSeqLen).fill(5), { chunkSize: 8, nSink: 4 })).toThrow(/exceed the model's max_seq_len/);
    tf.dispose([...pre.cache.keys, ...pre.cache.values]);
  });
});
