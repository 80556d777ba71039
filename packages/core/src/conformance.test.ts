import * as tf from '@tensorflow/tfjs-core';
import { expect, it } from 'vitest';
import { disposeKVCache, residentRatios, runStrategyConformance, syntheticCache } from './conformance.js';
import { createResolvedStrategy, selectBackend, type Strategy } from './index.js';
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
});

it('the resident measurement catches a planted float32 copy of a float16 cache', async () => {
  await selectBackend('wasm');
  const cache = syntheticCache(64);
  const dense = createResolvedStrategy('dense', { storage: 'float16' });
  // The same strategy, but its cache also keeps a float32 copy of layer 0's keys on the backend.
  const planted: Strategy = {
    ...dense,
    async compress(c) {
      const out = await dense.compress(c);
      const copy = tf.clone(c.keys[0]);
      const dispose = out.dispose.bind(out);
      out.dispose = () => {
        copy.dispose();
        dispose();
      };
      return out;
    },
  };
  const honest = await residentRatios(dense, cache);
  const caught = await residentRatios(planted, cache);
  // 4 layers of fp16 K and V (8 equal tensors): one extra float32 tensor is 2 of those 8 → ratio 1.25.
  expect(honest.afterCompress).toBeCloseTo(1, 12);
  expect(caught.afterCompress).toBeCloseTo(1.25, 12);
  expect(caught.afterCompress).toBeGreaterThan(1.1);
  disposeKVCache(cache);
});
