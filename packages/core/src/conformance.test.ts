import * as tf from '@tensorflow/tfjs-core';
import { expect, it } from 'vitest';
import { disposeKVCache, residentRatios, runStrategyConformance, syntheticCache } from './conformance.js';
import { SHARED_ROPE_ENTRIES, createResolvedStrategy, releaseSharedRopeTables, selectBackend, sharedRopeTableBytes, sharedRopeTensors, type KVCache, type Strategy } from './index.js';
import './dense/index.js';

// The dense strategy holds itself to the same contract as every plugin. float32 storage is the
// lossless setting; its "compressing" setting is float16 (ratio 1.0 would fail the ratio check), so
// dense is only checked through the lossless and bookkeeping paths below.
runStrategyConformance('dense', {
  compressing: { storage: 'float16' },
  lossless: { storage: 'float32' },
  losslessTolerance: 1e-6,
  badOptions: [{ storage: 'int3' }],
  ratioAboveOne: false,
  mla: { lossless: { storage: 'float32' }, losslessTolerance: 1e-6 },
});

it('the resident measurement catches a planted float32 copy of a float16 cache', async () => {
  await selectBackend('wasm');
  const cache = syntheticCache(64);
  const dense = createResolvedStrategy('dense', { storage: 'float16' });
  // The same strategy, but its cache also keeps a float32 copy of layer 0's keys on the backend.
  const planted: Strategy = {
    ...dense,
    compress: (async (c: KVCache) => {
      const out = await dense.compress(c);
      const copy = tf.clone(c.keys[0]);
      const dispose = out.dispose.bind(out);
      out.dispose = () => {
        copy.dispose();
        dispose();
      };
      return out;
    }) as Strategy['compress'],
  };
  const honest = await residentRatios(dense, cache);
  const caught = await residentRatios(planted, cache);
  // 4 layers of fp16 K and V (8 equal tensors): one extra float32 tensor is 2 of those 8 → ratio 1.25.
  expect(honest.afterCompress).toBeCloseTo(1, 12);
  expect(caught.afterCompress).toBeCloseTo(1.25, 12);
  expect(caught.afterCompress).toBeGreaterThan(1.1);
  disposeKVCache(cache);
});

it('shared device RoPE tables: one upload per key, kept across tf.tidy, bounded, and not counted as a cache\'s resident bytes', async () => {
  await selectBackend('wasm');
  releaseSharedRopeTables();
  const start = tf.memory().numTensors;
  let made = 0;
  const make = () => {
    made++;
    return [tf.zeros([4, 8]), tf.ones([4, 8])];
  };
  const a = tf.tidy(() => sharedRopeTensors('a', make));
  expect(a.every((t) => !t.isDisposed)).toBe(true);
  expect(tf.tidy(() => sharedRopeTensors('a', make))).toBe(a);
  expect(made).toBe(1);
  expect(sharedRopeTableBytes()).toBe(2 * 4 * 8 * 4);
  for (let i = 0; i < SHARED_ROPE_ENTRIES; i++) sharedRopeTensors(`k${i}`, make);
  expect(a.every((t) => t.isDisposed)).toBe(true); // least recently used, evicted
  expect(sharedRopeTableBytes()).toBe(SHARED_ROPE_ENTRIES * 2 * 4 * 8 * 4);
  releaseSharedRopeTables();
  expect(sharedRopeTableBytes()).toBe(0);
  expect(tf.memory().numTensors).toBe(start);
  // A strategy whose decode grows the shared tables: the growth is not the cache's, a planted copy still is.
  const cache = syntheticCache(64);
  const dense = createResolvedStrategy('dense', { storage: 'float16' });
  const withTables = (plant: boolean): Strategy => ({
    ...dense,
    compress: (async (c: KVCache) => {
      const out = await dense.compress(c);
      const copy = plant ? tf.clone(c.keys[0]) : null;
      const attend = out.attend?.bind(out);
      const dispose = out.dispose.bind(out);
      out.attend = attend
        ? (l, q, o) => {
            sharedRopeTensors(`big${l}`, () => [tf.zeros([64, 16])]);
            return attend(l, q, o);
          }
        : undefined;
      out.dispose = () => {
        copy?.dispose();
        dispose();
      };
      return out;
    }) as Strategy['compress'],
  });
  const honest = await residentRatios(withTables(false), cache);
  expect(sharedRopeTableBytes()).toBeGreaterThan(0);
  expect(honest.afterDecode).toBeCloseTo(1, 12);
  const caught = await residentRatios(withTables(true), cache);
  expect(caught.afterCompress).toBeCloseTo(1.25, 12);
  expect(caught.afterDecode).toBeGreaterThan(1.1); // the copy over the grown cache (4 appended tokens per layer)
  releaseSharedRopeTables();
  disposeKVCache(cache);
});
