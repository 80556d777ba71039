import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, applyRope, check, encodeHalf, isHostBackend, type KVCache } from '@kvpack/core';
import { topKPositions } from '../eviction/top-k.js';
import { sparseGeometry, type SparseIndex, type SparseLayer } from './sparse-index.js';
import type { SparseOptions } from './sparse-options.js';

/**
 * Float32 elements ([T, layers·H_kv, d]) of one batch of layers: 2^27 (512 MiB) — four layers of an
 * 8-KV-head, head_dim-128 model at T = 32K, one xKV group.
 */
export const SPARSE_BATCH_ELEMENTS = 2 ** 27;

/**
 * {@link buildSparseIndexOnHost} on the tfjs backend (the default off wasm/cpu, where reading the whole cache
 * back would dominate the compression), batched: the layers of a batch (all of them up to
 * {@link SPARSE_BATCH_ELEMENTS}, or `layersPerBatch`) are laid side by side along the KV-head axis,
 * [T, layers·H_kv, d], so one rotation (core `applyRope`), one chunk mean, one min-cosine score, one
 * top-k of the outlier chunks (strategy-utils `topKPositions`: lowest scores, ties to the lower chunk,
 * ascending) and one gather of the exact rows serve every layer and KV head of the batch. The parts
 * are rounded to float16 on the device (webgpu) and read back once they are all queued; only the
 * landmarks [C, H_kv, d], the outlier chunk indices and the exact rows come back (about 1/8 of the
 * keys, at 16 bits). The same rules as the host build, in float32: results agree with it up to
 * float32 rounding (tested).
 * @param layersPerBatch layers per batch (default: as many as fit {@link SPARSE_BATCH_ELEMENTS}, at least 1)
 */
export async function buildSparseIndexOnDevice(cache: KVCache, T: number, o: SparseOptions, layersPerBatch?: number): Promise<SparseIndex> {
  const { nKvHeads: H, headDim: d, nLayers: L } = cache.layout;
  const c = o.chunkSize;
  const { chunks: C, outliers: O, local } = sparseGeometry(T, o);
  const start = cache.startPosition ?? 0;
  const per = Math.max(1, Math.min(L, layersPerBatch ?? Math.floor(SPARSE_BATCH_ELEMENTS / Math.max(1, T * H * d))));
  check(Number.isInteger(per), 'config', `buildSparseIndex: layersPerBatch ${layersPerBatch} is not a layer count`);
  /** Per layer: the float16 bits of landmarks, outlier keys / values, local keys / values (pending), and the outlier chunks. */
  const halves: Promise<Uint16Array>[][] = [];
  const chunksOf: (tf.Tensor | null)[] = [];
  try {
    for (let l0 = 0; l0 < L; l0 += per) {
      const G = Math.min(per, L - l0);
      const GH = G * H;
      const parts = tf.tidy((): tf.TensorContainer => {
        const side = (xs: tf.Tensor3D[]) => (G === 1 ? xs[l0] : tf.concat(xs.slice(l0, l0 + G), 1)) as tf.Tensor3D; // [T, G·H, d]
        const K = applyRope(side(cache.keys), cache.rope, { start, count: T });
        const V = side(cache.values);
        let lm: tf.Tensor | null = null;
        let outl: tf.Tensor | null = null;
        let oK: tf.Tensor | null = null;
        let oV: tf.Tensor | null = null;
        if (C > 0) {
          const Kc = tf.reshape(tf.slice(K, [0, 0, 0], [C * c, GH, d]), [C, c, GH, d]);
          lm = tf.mean(Kc, 1); // [C, G·H, d]
          if (O > 0) {
            const dot = tf.sum(tf.mul(Kc, tf.reshape(lm, [C, 1, GH, d])), 3); // [C, c, G·H]
            const norm = (x: tf.Tensor, axis: number) => tf.sqrt(tf.sum(tf.square(x), axis));
            const den = tf.maximum(tf.mul(norm(Kc, 3), tf.reshape(norm(lm, 2), [C, 1, GH])), 1e-8);
            const score = tf.transpose(tf.min(tf.div(dot, den), 1)); // [G·H, C]: lowest cosine of each chunk
            outl = topKPositions(tf.neg(score) as tf.Tensor2D, O); // [G·H, O], lowest scores, ascending
            // Exact rows of every head's outlier chunks: rows t·G·H + h of K, V viewed as [T·G·H, d], [G·H, O·c, d].
            const tok = tf.add(tf.reshape(tf.mul(outl, tf.scalar(c, 'int32')), [GH, O, 1]), tf.reshape(tf.range(0, c, 1, 'int32'), [1, 1, c]));
            const rows = tf.reshape(tf.add(tf.mul(tok, tf.scalar(GH, 'int32')), tf.reshape(tf.range(0, GH, 1, 'int32'), [GH, 1, 1])), [-1]);
            oK = tf.reshape(tf.gather(tf.reshape(K, [T * GH, d]), rows), [GH, O * c, d]);
            oV = tf.reshape(tf.gather(tf.reshape(V, [T * GH, d]), rows), [GH, O * c, d]);
          }
        }
        const lK = tf.slice(K, [C * c, 0, 0], [local, GH, d]);
        const lV = tf.slice(V, [C * c, 0, 0], [local, GH, d]);
        // Layer g of the batch is KV heads g·H … (g + 1)·H − 1.
        return Array.from({ length: G }, (_, g) => ({
          halves: [
            lm && tf.slice(lm, [0, g * H, 0], [C, H, d]),
            oK && tf.slice(oK, [g * H, 0, 0], [H, O * c, d]),
            oV && tf.slice(oV, [g * H, 0, 0], [H, O * c, d]),
            tf.slice(lK, [0, g * H, 0], [local, H, d]),
            tf.slice(lV, [0, g * H, 0], [local, H, d]),
          ],
          outl: outl && tf.slice(outl, [g * H, 0], [H, O]),
        })) as unknown as tf.TensorContainer; // tidy keeps the tensors nested in these objects (nulls are skipped)
      }) as unknown as { halves: (tf.Tensor | null)[]; outl: tf.Tensor | null }[];
      for (const p of parts) {
        halves.push(p.halves.map((x) => halfBits(x)));
        chunksOf.push(p.outl);
        tf.dispose(p.halves.filter((x): x is tf.Tensor => x !== null));
      }
    }
    // Everything is queued: read it back.
    const bits = await Promise.all(halves.map((h) => Promise.all(h)));
    const outl = await Promise.all(chunksOf.map(async (t) => (t ? Int32Array.from((await t.data()) as Int32Array) : new Int32Array(0))));
    const layers = bits.map(([landmarks, outlierK, outlierV, localK, localV], l): SparseLayer => {
      check(landmarks.length === C * H * d && localK.length === local * H * d && localV.length === local * H * d, 'shape', 'buildSparseIndex: unexpected tensor sizes');
      return { landmarks, outlierChunks: outl[l], outlierK, outlierV, localK, localV };
    });
    return { options: o, chunkSize: c, chunks: C, outliers: O, local, layers };
  } finally {
    tf.dispose(chunksOf.filter((t): t is tf.Tensor => t !== null));
    // Readbacks still in flight after a failure dispose their own packed tensors (halfBits).
    await Promise.allSettled(halves.flat());
  }
}

/**
 * The float16 bits of x (round half to even; empty for null), without waiting: on the host backends
 * rounded at once from a synchronous read (a copy there); elsewhere packed on the device
 * ({@link HalfTensor.fromTensor}) and read back at 16 bits. Does not dispose x.
 */
function halfBits(x: tf.Tensor | null): Promise<Uint16Array> {
  if (!x || x.size === 0) return Promise.resolve(new Uint16Array(0));
  if (isHostBackend()) return Promise.resolve(encodeHalf(x.dataSync() as Float32Array));
  return HalfTensor.fromTensor(x).then((h) => h.bits().finally(() => h.dispose()));
}
