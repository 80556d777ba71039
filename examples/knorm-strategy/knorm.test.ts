import { runStrategyConformance, syntheticCache, disposeKVCache } from '@kvpack/core/conformance';
import { createStrategy, selectBackend } from '@kvpack/core';
import type { KeptTokensCache } from '@kvpack/strategy-utils';
import { expect, it } from 'vitest';
import './knorm.js';

// The suite every strategy passes (synthetic cache: T = 64, L = 4, H_kv = 2, d = 16).
runStrategyConformance('knorm', {
  compressing: { budget: 24 },
  lossless: { budget: 64 },
  badOptions: [{ budget: 0 }, { budget: 1.5 }, { budget: 2 ** 21 }],
});

it('keeps, per KV head, the budget tokens of lowest key norm (float64 re-computation)', async () => {
  await selectBackend('wasm');
  const cache = syntheticCache(64);
  const c = (await createStrategy({ name: 'knorm', options: { budget: 24 } }).compress(cache)) as KeptTokensCache;
  for (let l = 0; l < 4; l++) {
    const k = cache.keys[l].dataSync();
    for (let h = 0; h < 2; h++) {
      const norm = (t: number) => Math.hypot(...Array.from(k.subarray((t * 2 + h) * 16, (t * 2 + h + 1) * 16)));
      const want = Array.from({ length: 64 }, (_, t) => t).sort((a, b) => norm(a) - norm(b) || a - b).slice(0, 24).sort((a, b) => a - b);
      const got = Array.from(c.keptPositions(l)).filter((_, i) => i % 2 === h);
      expect(got).toEqual(want);
    }
  }
  c.dispose();
  disposeKVCache(cache);
});
