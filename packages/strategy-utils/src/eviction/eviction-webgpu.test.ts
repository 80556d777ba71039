// The backend selection of the eviction layer (top-k positions with deterministic ties) and the
// eviction compress on a WebGPU adapter (a software one such as Mesa's lavapipe is enough; see
// scripts/webgpu-software.sh), against the host rule. Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { countWebGpuDispatches, selectBackend } from '@kvpack/core';
import { keepTopScores, topKPositions } from './scorer.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `eviction selection on webgpu (SKIPPED: no WebGPU adapter: ${unavailable})` : 'eviction selection on webgpu';
if (unavailable) console.warn(`[kvpack] ${title}`);

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  it('topKPositions equals the host rule: ties to the lower position, ±Infinity, ±float32 max and NaN; no tensor left', async () => {
    const n0 = tf.memory().numTensors;
    const MAX = 3.4028234663852886e38;
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 3 }), fc.integer({ min: 1, max: 300 }), fc.nat(), fc.array(fc.integer({ min: -4, max: 5 }), { minLength: 97, maxLength: 97 }), async (H, T, kSeed, raw) => {
        const k = kSeed % (T + 1);
        const code = (v: number) => (v === 3 ? Infinity : v === 4 ? NaN : v === -3 ? -Infinity : v === 5 ? MAX : v === -4 ? -MAX : v / 2);
        const scores = Float32Array.from({ length: H * T }, (_, i) => code(raw[(i * 7 + (i >> 5)) % raw.length]));
        const want = keepTopScores(scores, H, T, k);
        const t = tf.tensor2d(scores, [H, T]);
        const p = topKPositions(t, k);
        const got = (await p.data()) as Int32Array;
        tf.dispose([t, p]);
        for (let h = 0; h < H; h++) expect(Array.from(got.subarray(h * k, (h + 1) * k))).toEqual(Array.from({ length: k }, (_, j) => want[j * H + h]));
      }),
      { seed: 5, numRuns: 40 },
    );
    expect(tf.memory().numTensors).toBe(n0);
  });
  it('a long row, split over chunks (five kernels), selects over many blocks: heavy ties, a k-th value shared by thousands, NaN and -0', async () => {
    const n0 = tf.memory().numTensors;
    const H = 3;
    const T = 9001;
    // Few distinct values (many ties at the k-th), negative zeros against zeros, some NaN.
    const scores = Float32Array.from({ length: H * T }, (_, i) => ((i * 2654435761) >>> 0) % 97 === 0 ? NaN : (((i * 40503) >>> 7) % 5) - 2 || (i % 2 ? -0 : 0));
    for (const k of [1, 17, 2048, 4500, 9000]) {
      const want = keepTopScores(scores, H, T, k);
      const t = tf.tensor2d(scores, [H, T]);
      const { result: p, dispatches } = await countWebGpuDispatches(() => topKPositions(t, k));
      expect(dispatches).toBe(5);
      const got = (await p.data()) as Int32Array;
      tf.dispose([t, p]);
      for (let h = 0; h < H; h++) expect(Array.from(got.subarray(h * k, (h + 1) * k)), `k = ${k}, head ${h}`).toEqual(Array.from({ length: k }, (_, j) => want[j * H + h]));
    }
    expect(tf.memory().numTensors).toBe(n0);
  });
});
