// The tiled WGSL GEMM of the range finder on a WebGPU adapter (a software one such as Mesa's lavapipe
// is enough; see scripts/webgpu-software.sh), against float64 host products. Without an adapter the
// suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { KvpackError, mulberry32, selectBackend, truncatedSvd, wgslValidationErrors } from '@kvpack/core';
import { GEMM_TILES, defaultSplitK, rangeFinderMatmul, setRangeFinderProducts, wgslMatmul } from './tall-skinny-wgsl.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `tall-skinny WGSL GEMM (SKIPPED: no WebGPU adapter: ${unavailable})` : 'tall-skinny WGSL GEMM (webgpu)';
if (unavailable) console.warn(`[kvpack] ${title}`);

function randomData(n: number, seed: number): Float32Array {
  const u = mulberry32(seed);
  return Float32Array.from({ length: n }, () => 2 * u() - 1);
}

/** op(A)·op(B) in float64 from the stored row-major arrays, and Σ|op(A)||op(B)| (the rounding scale). */
function hostProduct(a: Float32Array, b: Float32Array, M: number, N: number, K: number, tA: boolean, tB: boolean): { c: Float64Array; scale: Float64Array } {
  const c = new Float64Array(M * N);
  const scale = new Float64Array(M * N);
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      let s = 0;
      let w = 0;
      for (let k = 0; k < K; k++) {
        const x = tA ? a[k * M + m] : a[m * K + k];
        const y = tB ? b[n * K + k] : b[k * N + n];
        s += x * y;
        w += Math.abs(x * y);
      }
      c[m * N + n] = s;
      scale[m * N + n] = w;
    }
  return { c, scale };
}

async function expectProduct(M: number, N: number, K: number, tA: boolean, tB: boolean, opts: Parameters<typeof wgslMatmul>[4] = {}, seed = 1): Promise<void> {
  const ad = randomData(M * K, seed);
  const bd = randomData(K * N, seed + 100);
  const a = tf.tensor2d(ad, tA ? [K, M] : [M, K]);
  const b = tf.tensor2d(bd, tB ? [N, K] : [K, N]);
  const n0 = tf.memory().numTensors;
  const c = wgslMatmul(a, b, tA, tB, opts);
  expect(tf.memory().numTensors).toBe(n0 + 1);
  expect(c.shape).toEqual([M, N]);
  const got = await c.data();
  tf.dispose([a, b, c]);
  const { c: want, scale } = hostProduct(ad, bd, M, N, K, tA, tB);
  let worst = 0;
  for (let i = 0; i < M * N; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]) / (scale[i] + 1e-30));
  // float32 summation: |error| ≤ ~K·2⁻²⁴·Σ|a·b| worst case; a wrong index gives O(1).
  expect(worst, `${tA ? 'T' : 'N'}${tB ? 'T' : 'N'} ${M}×${N}×${K} ${JSON.stringify(opts)}`).toBeLessThan(Math.max(1e-6, K * 2 ** -24));
}

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  it('X·B, Xᵀ·B, A·Bᵀ and Aᵀ·Bᵀ match float64 host products at sizes that are not multiples of the tile', async () => {
    for (const [tA, tB] of [
      [false, false],
      [true, false],
      [false, true],
      [true, true],
    ] as const)
      await expectProduct(131, 69, 37, tA, tB);
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('every benchmarked tile, split-K on a long reduction (partial slices summed in a second pass), and tiny shapes', async () => {
    // Each tile through the split path with A read transposed (the whole-K path and the other
    // transposes share the tile's code and are checked above with the default tile).
    for (const tile of Object.values(GEMM_TILES)) await expectProduct(133, 70, 45, true, false, { tile, splitK: 3 }, 4);
    // vec4 loads: Aᵀ and B rows a multiple of 4 (not of the tile), split and whole; B alone in X·B.
    for (const tile of Object.values(GEMM_TILES).filter((t) => t.vec4Loads)) {
      await expectProduct(132, 68, 45, true, false, { tile, splitK: 3 }, 8);
      await expectProduct(132, 68, 45, false, false, { tile }, 9);
    }
    // Xᵀ·Q shape: short sides, long reduction → split by default.
    expect(defaultSplitK(24, 20, 1500)).toBeGreaterThan(1);
    await expectProduct(24, 20, 1500, true, false, {}, 5);
    await expectProduct(1, 1, 1, false, false, {}, 6);
    await expectProduct(3, 5, 2, true, true, {}, 7);
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('refuses bad operands with a KvpackError and leaks no tensor', async () => {
    const a = tf.zeros([4, 3]) as tf.Tensor2D;
    const b = tf.zeros([4, 2]) as tf.Tensor2D;
    const i = tf.zeros([3, 2], 'int32') as tf.Tensor2D;
    const n0 = tf.memory().numTensors;
    expect(() => wgslMatmul(a, b)).toThrow(/inner dimensions differ/);
    expect(() => wgslMatmul(a, i)).toThrow(/float32/);
    expect(() => wgslMatmul(a, b, true, false, { splitK: 0 })).toThrow(KvpackError);
    expect(() => wgslMatmul(a, b, true, false, { tile: { bm: 64, bn: 64, bk: 16, tm: 3, tn: 4 } })).toThrow(/tile/);
    expect(() => setRangeFinderProducts('x' as 'wgsl')).toThrow(/wgsl/);
    expect(tf.memory().numTensors).toBe(n0);
    tf.dispose([a, b, i]);
  });

  it('truncatedSvd with the WGSL products gives the tfjs products’ factors (to float32 rounding)', async () => {
    const T = 300;
    const Fi = 40;
    // Column blocks of a rank-12 matrix plus small noise.
    const X = [0, 1].map((g) =>
      tf.tidy(() => {
        const A = tf.tensor2d(randomData(T * 12, 10), [T, 12]);
        const B = tf.tensor2d(randomData(12 * Fi, 11 + g), [12, Fi]);
        return tf.add(tf.matMul(A, B), tf.mul(tf.tensor2d(randomData(T * Fi, 20 + g), [T, Fi]), 1e-3)) as tf.Tensor2D;
      }),
    );
    const n0 = tf.memory().numTensors;
    const mm = rangeFinderMatmul(); // the WGSL GEMM by default on webgpu
    expect(mm).toBeDefined();
    setRangeFinderProducts('tfjs');
    expect(rangeFinderMatmul()).toBeUndefined();
    const opts = { rank: 10, oversample: 4, powerIters: 1, seed: 5 };
    const a = await truncatedSvd(X, { ...opts, matmul: mm });
    const b = await truncatedSvd(X, opts);
    const rec = async (f: typeof a) =>
      Promise.all(
        f.coeffs.map(async (c) => {
          const p = tf.matMul(f.basis, c);
          const d = await p.data();
          p.dispose();
          return d;
        }),
      );
    const [ra, rb] = [await rec(a), await rec(b)];
    for (let g = 0; g < 2; g++) {
      let num = 0;
      let den = 0;
      for (let i = 0; i < ra[g].length; i++) {
        num += (ra[g][i] - rb[g][i]) ** 2;
        den += rb[g][i] ** 2;
      }
      expect(Math.sqrt(num / den)).toBeLessThan(1e-4);
    }
    for (let j = 0; j < 10; j++) expect(a.singularValues![j]).toBeCloseTo(b.singularValues![j], 2);
    tf.dispose([a.basis, ...a.coeffs, b.basis, ...b.coeffs]);
    expect(tf.memory().numTensors).toBe(n0);
    setRangeFinderProducts('wgsl');
    expect(rangeFinderMatmul()).toBeDefined();
    tf.dispose(X);
    expect(await wgslValidationErrors()).toEqual([]);
  });
});
