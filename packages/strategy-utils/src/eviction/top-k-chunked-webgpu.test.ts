// The chunked top-k kernels (rows spread over many workgroups: four histogram rounds and a compaction)
// on a WebGPU adapter (a software one such as Mesa's lavapipe is enough; see scripts/webgpu-software.sh),
// against the host rule `keepTopScores` and the single-workgroup kernel. Without an adapter the suite
// is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { countWebGpuDispatches, selectBackend } from '@kvpack/core';
import { keepTopScores } from './scorer.js';
import { topKPositions } from './top-k.js';
import { plainScores, topKChunksPerRow, topKPositionsChunkedWgsl, topKPositionsWgsl, type WgslScoreSource } from './top-k-wgsl.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `chunked top-k on webgpu (SKIPPED: no WebGPU adapter: ${unavailable})` : 'chunked top-k on webgpu';
if (unavailable) console.warn(`[kvpack] ${title}`);

const MAX = 3.4028234663852886e38;

/** Rows of `got` (int32 [H, k]) against keepTopScores' [k, H]. */
function expectRows(got: Int32Array, want: Int32Array, H: number, k: number, what: string): void {
  for (let h = 0; h < H; h++) {
    const row = Array.from(got.subarray(h * k, (h + 1) * k));
    const ref = Array.from({ length: k }, (_, j) => want[j * H + h]);
    expect(row, `${what}, row ${h}`).toEqual(ref);
  }
}

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  it('any chunk count gives the host rule on short rows: ties across chunk boundaries, ±0, ±Infinity, ±float32 max, NaN, empty trailing chunks; no tensor left', async () => {
    const n0 = tf.memory().numTensors;
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 3 }),
        fc.integer({ min: 2, max: 700 }),
        fc.integer({ min: 2, max: 40 }),
        fc.nat(),
        fc.array(fc.integer({ min: -5, max: 5 }), { minLength: 61, maxLength: 61 }),
        async (H, T, chunks, kSeed, raw) => {
          const k = 1 + (kSeed % (T - 1));
          const code = (v: number) =>
            v === 3 ? Infinity : v === 4 ? NaN : v === -3 ? -Infinity : v === 5 ? MAX : v === -4 ? -MAX : v === -5 ? -0 : v / 2;
          const scores = Float32Array.from({ length: H * T }, (_, i) => code(raw[(i * 7 + (i >> 5)) % raw.length]));
          const want = keepTopScores(scores, H, T, k);
          const t = tf.tensor2d(scores, [H, T]);
          const p = topKPositionsChunkedWgsl(plainScores(t), H, T, k, chunks);
          const got = (await p.data()) as Int32Array;
          tf.dispose([t, p]);
          expectRows(got, want, H, k, `T = ${T}, k = ${k}, ${chunks} chunks`);
        },
      ),
      { seed: 11, numRuns: 40 },
    );
    expect(tf.memory().numTensors).toBe(n0);
  });

  it('rows longer than 65,536: five dispatches, the same positions as the host rule and the one-workgroup kernel at k = 1, 2, chunk-sized k, T − 2, T − 1', async () => {
    const n0 = tf.memory().numTensors;
    const H = 2;
    const T = 70001;
    const chunks = topKChunksPerRow(H, T);
    expect(chunks).toBeGreaterThan(8);
    const C = Math.ceil(Math.ceil(T / chunks) / 32) * 32; // the kernel's chunk length
    // Row 0: few distinct values (thousands tie at the k-th), -0 against +0, NaN; row 1: a plateau of
    // one value across every chunk boundary, the rest below it.
    const scores = new Float32Array(H * T);
    for (let i = 0; i < T; i++) {
      scores[i] = ((i * 2654435761) >>> 0) % 89 === 0 ? NaN : (((i * 40503) >>> 7) % 5) - 2 || (i % 2 ? -0 : 0);
      const d = i % C;
      scores[T + i] = d < 40 || d >= C - 40 ? 1.5 : ((i * 69069) >>> 16) / 65536;
    }
    const t = tf.tensor2d(scores, [H, T]);
    for (const k of [1, 2, C - 1, C + 1, 30000, T - 2, T - 1]) {
      const want = keepTopScores(scores, H, T, k);
      const { result: p, dispatches } = await countWebGpuDispatches(() => topKPositions(t, k));
      expect(dispatches, `k = ${k}`).toBe(5);
      const one = topKPositionsChunkedWgsl(plainScores(t), H, T, k, 1);
      const [got, gotOne] = (await Promise.all([p.data(), one.data()])) as Int32Array[];
      tf.dispose([p, one]);
      expectRows(got, want, H, k, `k = ${k}`);
      expect(Array.from(got), `k = ${k}: the one-workgroup kernel`).toEqual(Array.from(gotOne));
    }
    t.dispose();
    expect(tf.memory().numTensors).toBe(n0);
  });

  it('a row of one repeated score keeps its first k positions; rows of 4,096 (or over 512 rows) take one dispatch, 4,097 five', async () => {
    const n0 = tf.memory().numTensors;
    for (const [H, T, dispatchesWanted] of [[3, 4096, 1], [3, 4097, 5], [3, 40000, 5], [513, 4097, 1]] as const) {
      const t = tf.fill([H, T], -0.25) as tf.Tensor2D;
      const k = T - 3;
      const { result: p, dispatches } = await countWebGpuDispatches(() => topKPositions(t, k));
      expect(dispatches, `${H} rows of ${T}`).toBe(dispatchesWanted);
      const got = (await p.data()) as Int32Array;
      tf.dispose([t, p]);
      for (let h = 0; h < H; h++) {
        const row = got.subarray(h * k, (h + 1) * k);
        let ok = true;
        for (let j = 0; j < k; j++) if (row[j] !== j) ok = false;
        expect(ok, `T = ${T}, row ${h}: positions 0 … k − 1`).toBe(true);
      }
    }
    expect(tf.memory().numTensors).toBe(n0);
  });

  it('a caller-defined score source (scores read transposed) goes through the chunked path', async () => {
    const n0 = tf.memory().numTensors;
    const H = 4;
    const T = 9000;
    // x [T, H]: row h of the selection is column h.
    const x = Float32Array.from({ length: T * H }, (_, i) => (((i * 1103515245 + 12345) >>> 8) % 61) - 30);
    const byRow = new Float32Array(H * T);
    for (let i = 0; i < T; i++) for (let h = 0; h < H; h++) byRow[h * T + i] = x[i * H + h];
    const xt = tf.tensor2d(x, [T, H]);
    const src: WgslScoreSource = {
      key: `test_columns_${H}`,
      names: ['X'],
      inputs: [xt],
      code: `fn rowLength() -> u32 { return u32(uniforms.xShape[0]); }
fn score(row: u32, i: u32) -> f32 { return X[i * ${H}u + row]; }`,
    };
    for (const k of [7, 4500]) {
      const want = keepTopScores(byRow, H, T, k);
      const { result: p, dispatches } = await countWebGpuDispatches(() => topKPositionsWgsl(src, H, T, k));
      expect(dispatches).toBe(5);
      const got = (await p.data()) as Int32Array;
      p.dispose();
      expectRows(got, want, H, k, `k = ${k}`);
    }
    xt.dispose();
    expect(tf.memory().numTensors).toBe(n0);
  });
});
