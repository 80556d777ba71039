import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, createStrategy, selectBackend, type KVCache, type ModelLayout } from '@kvpack/core';
import { runStrategyConformance } from '@kvpack/core/conformance';
import { LlamaModel, Session, loadLlama2cCheckpoint } from '@kvpack/models';
import type { RaggedKeptCache } from '@kvpack/strategy-utils';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import './index.js'; // registers the strategy
import { f16, prng, randomCache, take, type RandomCache } from '../testing/testkit.js';

/** The scores a reconstruction pass would give: seeded uniform [T, H_kv] per layer. */
function withScores(cache: KVCache, seed = 3): KVCache {
  const T = cache.keys[0].shape[0];
  const H = cache.layout.nKvHeads;
  return { ...cache, reconstructionScores: cache.keys.map((_, l) => tf.randomUniform([T, H], 0, 1, 'float32', seed + l) as tf.Tensor2D) };
}

runStrategyConformance('kvzip', {
  compressing: { budget: 24, nSink: 4 },
  lossless: { budget: 64 },
  badOptions: [{ budget: 0 }, { chunkSize: 0 }, { layerwise: 'no' }, { prompt: 5 }],
  augment: (c) => withScores(c),
});

describe('kvzip: kept tokens against a direct float64 selection of the reconstruction scores', () => {
  const layout: ModelLayout = { nLayers: 3, nHeads: 4, nKvHeads: 2, headDim: 16 };
  const { nLayers: L, nKvHeads: H, headDim: d } = layout;
  const T = 40;
  let rc: RandomCache;
  let scores: Float32Array[];
  beforeAll(async () => {
    await selectBackend('wasm');
    rc = randomCache(T, layout, 51, 4);
    // Per layer [T, H_kv]; layer 1 scores higher, so the global budget gives it more tokens.
    const u = prng(77);
    scores = Array.from({ length: L }, (_, l) => Float32Array.from({ length: T * H }, () => u() * (l === 1 ? 2 : 1)));
  });
  afterAll(() => rc.dispose());

  for (const layerwise of [false, true])
    it(layerwise ? 'layerwise: B·H_kv per layer over its heads, sinks first' : 'global: the L·H_kv·B best over all layers and heads, sinks first', async () => {
      const B = 10;
      const nSink = 3;
      const cache: KVCache = { ...rc.cache, reconstructionScores: scores.map((s) => tf.tensor2d(s, [T, H])) };
      const n0 = tf.memory().numTensors;
      const c = (await createStrategy({ name: 'kvzip', options: { budget: B, nSink, layerwise } }).compress(cache)) as RaggedKeptCache;
      // Float64 selection: sinks +∞, then the top scores over the pool (all layers, or each layer).
      const s = (l: number, h: number, t: number) => (t < nSink ? Infinity : scores[l][t * H + h]);
      const kth = (pool: number[], k: number) => [...pool].sort((a, b) => b - a)[k - 1];
      const all = (ls: number[]) => ls.flatMap((l) => Array.from({ length: H * T }, (_, i) => s(l, Math.floor(i / T), i % T)));
      let total = 0;
      const perLayer: number[] = [];
      for (let l = 0; l < L; l++) {
        const bar = layerwise ? kth(all([l]), B * H) : kth(all([0, 1, 2]), B * H * L);
        const keys = take(c.keys(l));
        let n = 0;
        for (let h = 0; h < H; h++) {
          const kept = Array.from(c.keptPositions(l, h));
          n += kept.length;
          for (let t = 0; t < T; t++) expect(kept.includes(t), `layer ${l} head ${h} token ${t}`).toBe(s(l, h, t) >= bar);
          kept.forEach((p, j) => {
            for (let ch = 0; ch < d; ch++) expect(keys[(j * H + h) * d + ch]).toBe(Math.fround(f16(rc.postKeys[l][(p * H + h) * d + ch])));
          });
        }
        perLayer.push(n);
        total += n;
      }
      expect(total).toBe(L * H * B);
      if (layerwise) expect(perLayer).toEqual([B * H, B * H, B * H]);
      else expect(perLayer[1]).toBeGreaterThan(B * H); // the higher-scoring layer keeps more
      // Bytes: the ragged rows, positions and per-head counts.
      expect(c.byteSize()).toBe(total * (2 * d * 2 + 4) + L * H * 4);
      c.dispose();
      expect(tf.memory().numTensors).toBe(n0);
      tf.dispose(cache.reconstructionScores!);
    });

  it('names what is missing when the runner gave no reconstruction scores', async () => {
    const err = await createStrategy({ name: 'kvzip', options: { budget: 10 } })
      .compress(rc.cache)
      .then(() => null, (e: unknown) => e);
    expect(err).toBeInstanceOf(KvpackError);
    expect((err as KvpackError).message).toMatch(/reconstructionScores/);
  });
});

const repoRoot = fileURLToPath(new URL('../../../../', import.meta.url));
const STORIES = process.env.KVPACK_MODELS_DIR ? resolve(process.env.KVPACK_MODELS_DIR, 'stories260K') : resolve(repoRoot, 'models', 'stories260K');
const HAVE = existsSync(resolve(STORIES, 'stories260K_q80.bin'));

describe.skipIf(!HAVE)(`kvzip through a generation session on stories260K${HAVE ? '' : ` (SKIPPED: ${STORIES} not found; set KVPACK_MODELS_DIR)`}`, () => {
  it('the session runs the reconstruction pass the capability asks for, and the kept tokens follow its scores', async () => {
    await selectBackend('wasm');
    const model = new LlamaModel(await loadLlama2cCheckpoint(resolve(STORIES, 'stories260K_q80.bin')));
    const ids = Array.from({ length: 30 }, (_, i) => 20 + ((i * 37) % 400));
    const o = { budget: 8, nSink: 2, layerwise: true };
    const s = await Session.start(model, { strategy: 'kvzip', options: o });
    await s.prefill(ids);
    const c = (await s.compress()) as RaggedKeptCache;
    // The same pass run directly (the session has no tokenizer: the context alone is re-read).
    const pre = await model.prefill(ids, { logits: 'last' });
    pre.logits.dispose();
    const scores = model.reconstructionScores(pre.cache, ids, [], { chunkSize: 2048, nSink: 2 });
    const H = model.layout.nKvHeads;
    for (let l = 0; l < model.layout.nLayers; l++) {
      const sc = scores[l].dataSync();
      const v = (h: number, t: number) => (t < 2 ? Infinity : sc[t * H + h]);
      const pool = Array.from({ length: H * ids.length }, (_, i) => v(Math.floor(i / ids.length), i % ids.length)).sort((a, b) => b - a);
      const bar = pool[o.budget * H - 1];
      for (let h = 0; h < H; h++) {
        const kept = Array.from(c.keptPositions(l, h));
        for (let t = 0; t < ids.length; t++) if (Math.abs(v(h, t) - bar) > 1e-6) expect(kept.includes(t), `layer ${l} head ${h} token ${t}`).toBe(v(h, t) > bar);
      }
    }
    tf.dispose([...scores, ...pre.cache.keys, ...pre.cache.values]);
    s.dispose();
    model.dispose();
  });
});
