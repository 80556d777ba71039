import * as tf from '@tensorflow/tfjs-core';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, disposeKVCache, selectBackend, type KVCache } from '@kvpack/core';
import { LlamaModel, Session, loadLlama2cCheckpoint } from '@kvpack/models';
import './index.js';
import { storiesPaths } from './test-utils.js';

/**
 * An xKV cache kept across a save → restore: a session on stories260K (L = 5, H_kv·d = 32; xKV-4 with
 * rankK 4, rankV 6 per layer at T = 96 prompt tokens).
 */
const S = storiesPaths();
const options = { layersPerGroup: 4, rankK: 4, rankV: 6 };

async function take(s: Session, maxTokens: number): Promise<number[]> {
  const out: number[] = [];
  for await (const t of s.generate({ maxTokens, sampling: 'greedy' })) out.push(t);
  return out;
}

describe.skipIf(!S.have)(`xkv sessions on stories260K${S.skip}`, () => {
  let model: LlamaModel;
  let ids: number[];
  let start: number;
  beforeAll(async () => {
    await selectBackend('wasm');
    model = new LlamaModel(await loadLlama2cCheckpoint(S.bin));
    ids = JSON.parse(readFileSync(S.oracle, 'utf8')).greedy_ids;
    await model.fingerprint();
    start = tf.memory().numTensors;
  });
  afterAll(() => {
    expect(tf.memory().numTensors).toBe(start);
    model?.dispose();
  });

  it('tokens decoded after save → restore (in-memory bytes) equal the in-process tokens exactly', async () => {
    for (const decode of ['full', 'sparse'] as const) {
      const o = decode === 'sparse' ? { ...options, decode, sparse: { budget: 32, chunkSize: 8, outlierChunks: 1, localTokens: 8 } } : options;
      const live = await Session.start(model, { strategy: 'xkv', options: o });
      await live.prefill(ids.slice(0, 96));
      const first = await take(live, 10);
      const bytes = live.cache.serialize();
      const saved = { tokens: [...live.tokens!], pending: [...live.pendingTokens] };
      const inProcess = await take(live, 24);
      live.dispose();
      const restored = await Session.resume(model, bytes, { tokens: saved.tokens, remainingTokens: saved.pending });
      expect(restored.cache.strategy).toBe('xkv');
      expect(restored.tokens).toEqual([...ids.slice(0, 96), ...first]);
      expect(await take(restored, 24)).toEqual(inProcess);
      restored.dispose();
    }
  });

  it('a restored prefix + the remaining tokens equals prefilling all, compressing the same prefix and decoding the rest', async () => {
    const P = ids.slice(0, 96);
    const R = ids.slice(96, 112);
    // Session path: prefill P, compress, serialize; restore and feed R.
    const s0 = await Session.start(model, { strategy: 'xkv', options });
    await s0.prefill(P);
    const bytes = (await s0.compress()).serialize();
    s0.dispose();
    const s = await Session.resume(model, bytes, { tokens: P });
    const got = await s.step(R);
    s.dispose();
    // Independent path: one prefill over P + R; its first 96 keys/values (causal: P's own) compressed
    // by a strategy built apart; R decoded over it with the model's decode directly.
    const full = await model.prefill([...P, ...R]);
    full.logits.dispose();
    const slice = (x: tf.Tensor3D) => tf.slice(x, [0, 0, 0], [96, -1, -1]) as tf.Tensor3D;
    const prefix: KVCache = { ...full.cache, keys: full.cache.keys.map(slice), values: full.cache.values.map(slice) };
    disposeKVCache(full.cache);
    const c = await createStrategy({ name: 'xkv', options }).compress(prefix);
    disposeKVCache(prefix);
    const t = model.decode(R, c, 96);
    const want = (await t.data()) as Float32Array;
    t.dispose();
    c.dispose();
    // On wasm a prefill of P alone and one of P + R give P's keys/values bit for bit (causal, row-wise
    // products), the seeded SVD is deterministic and the serialization exact: the logits agree exactly
    // (tolerance 0; another backend's products could differ in float32 rounding).
    let worst = 0;
    for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got.data[i] - want[i]));
    expect(worst).toBe(0);
    const arg = (d: Float32Array, r: number) => {
      const row = d.subarray(r * 512, (r + 1) * 512);
      return row.indexOf(Math.max(...row));
    };
    for (let r = 0; r < 16; r++) expect(arg(got.data, r)).toBe(arg(want, r));
  });
});
