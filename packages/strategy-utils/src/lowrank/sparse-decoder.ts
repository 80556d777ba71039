import * as tf from '@tensorflow/tfjs-core';
import { decodeHalf, isHostBackend } from '@kvpack/core';
import type { DecodeState } from './decode-state.js';
import type { QueryBlocks } from './query-blocks.js';
import type { SparseIndex } from './sparse-index.js';

/** Long-lived per-layer tensors of sparse decode (built on first use, held by the DecodeState). */
interface SparseLayerTensors {
  /** Landmarks per KV head, transposed, [d, C]. */
  lt: tf.Tensor2D[];
  /** −1e30 at each head's outlier chunks, [H_kv, 1, C]; null without outliers. */
  mask: tf.Tensor3D | null;
  /** Exact keys / values per KV head: its outlier tokens then the local tokens, [E₀, d]. */
  kx: tf.Tensor2D[];
  vx: tf.Tensor2D[];
  /** (token, KV head) of every exact row, [H_kv·E₀, 2] int32, and those rows' keys / values [H_kv·E₀, d]. */
  exactIdx: tf.Tensor2D;
  exactK: tf.Tensor2D;
  exactV: tf.Tensor2D;
  /** All heads' landmarks, transposed, [H_kv, d, C] (batched path). */
  ltAll: tf.Tensor3D;
}

/**
 * The device side of a sparse index (sparse-index.ts): per-layer tensors of the landmarks and exact
 * rows, built on the backend on first use of a layer and held by the {@link DecodeState} (freed with
 * the cache), and the chunk selection. The attend paths over it are in sparse-attend.ts.
 */
export class SparseDecoder {
  private readonly perLayer = new Map<number, SparseLayerTensors>();
  private scratch = new Float32Array(0);

  constructor(
    readonly state: DecodeState,
    readonly index: SparseIndex,
  ) {}

  /** Exact tokens per KV head E₀ = O·c + local. */
  get exactPerHead(): number {
    return this.index.outliers * this.index.chunkSize + this.index.local;
  }

  /** The (token index) list of KV head h's exact tokens: its outlier chunks' tokens, then the local tokens. */
  exactTokens(layer: number, h: number): number[] {
    const { outliers: O, chunkSize: c, chunks: C, local } = this.index;
    const oc = this.index.layers[layer].outlierChunks;
    const out: number[] = [];
    for (let k = 0; k < O; k++) for (let j = 0; j < c; j++) out.push(oc[h * O + k] * c + j);
    for (let u = 0; u < local; u++) out.push(C * c + u);
    return out;
  }

  /** The layer's index tensors (built once). */
  tensors(layer: number): SparseLayerTensors {
    let t = this.perLayer.get(layer);
    if (t) return t;
    const { nKvHeads: H, headDim: d } = this.state.src.layout;
    const F = H * d;
    const { chunks: C, outliers: O, local, chunkSize: c } = this.index;
    const L = this.index.layers[layer];
    const E0 = this.exactPerHead;
    const lmk = decodeHalf(L.landmarks);
    const oK = decodeHalf(L.outlierK);
    const oV = decodeHalf(L.outlierV);
    const lK = decodeHalf(L.localK);
    const lV = decodeHalf(L.localV);
    const hold = <T extends tf.Tensor>(x: T) => this.state.hold(x);
    const lt: tf.Tensor2D[] = [];
    const kx: tf.Tensor2D[] = [];
    const vx: tf.Tensor2D[] = [];
    const idx = new Int32Array(H * E0 * 2);
    const ltData = new Float32Array(H * d * C);
    const exK = new Float32Array(H * E0 * d);
    const exV = new Float32Array(H * E0 * d);
    for (let h = 0; h < H; h++) {
      const a = new Float32Array(d * C);
      for (let ch = 0; ch < C; ch++) for (let e = 0; e < d; e++) a[e * C + ch] = lmk[ch * F + h * d + e];
      ltData.set(a, h * d * C);
      // Per-head tensors for the loop path (wasm/cpu); the batched path reads the stacked ones.
      if (isHostBackend()) lt.push(hold(tf.tensor2d(a, [d, C])));
      const k = new Float32Array(E0 * d);
      const v = new Float32Array(E0 * d);
      k.set(oK.subarray(h * O * c * d, (h + 1) * O * c * d));
      v.set(oV.subarray(h * O * c * d, (h + 1) * O * c * d));
      for (let u = 0; u < local; u++) {
        k.set(lK.subarray(u * F + h * d, u * F + h * d + d), (O * c + u) * d);
        v.set(lV.subarray(u * F + h * d, u * F + h * d + d), (O * c + u) * d);
      }
      if (isHostBackend()) {
        kx.push(hold(tf.tensor2d(k, [E0, d])));
        vx.push(hold(tf.tensor2d(v, [E0, d])));
      }
      exK.set(k, h * E0 * d);
      exV.set(v, h * E0 * d);
      this.exactTokens(layer, h).forEach((tok, i) => {
        idx[(h * E0 + i) * 2] = tok;
        idx[(h * E0 + i) * 2 + 1] = h;
      });
    }
    let mask: tf.Tensor3D | null = null;
    if (O > 0) {
      const m = new Float32Array(H * C);
      for (let h = 0; h < H; h++) for (let k = 0; k < O; k++) m[h * C + L.outlierChunks[h * O + k]] = -1e30;
      mask = hold(tf.tensor3d(m, [H, 1, C]));
    }
    t = {
      lt,
      mask,
      kx,
      vx,
      exactIdx: hold(tf.tensor2d(idx, [H * E0, 2], 'int32')),
      exactK: hold(tf.tensor2d(exK, [H * E0, d])),
      exactV: hold(tf.tensor2d(exV, [H * E0, d])),
      ltAll: hold(tf.tensor3d(ltData, [H, d, C])),
    };
    this.perLayer.set(layer, t);
    return t;
  }

  /** The layer's tensors with the per-head lists of the loop path filled (split from the stacked ones when built for the batched path). */
  loopTensors(layer: number): SparseLayerTensors {
    const t = this.tensors(layer);
    if (t.lt.length === 0) {
      const H = t.ltAll.shape[0];
      const E0 = this.exactPerHead;
      const d = t.ltAll.shape[1];
      tf.tidy(() => {
        t.lt.push(...(tf.unstack(t.ltAll, 0) as tf.Tensor2D[]).map((x) => this.state.hold(x)));
        t.kx.push(...(tf.unstack(tf.reshape(t.exactK, [H, E0, d]), 0) as tf.Tensor2D[]).map((x) => this.state.hold(x)));
        t.vx.push(...(tf.unstack(tf.reshape(t.exactV, [H, E0, d]), 0) as tf.Tensor2D[]).map((x) => this.state.hold(x)));
      });
    }
    return t;
  }

  /**
   * Overwrites a full reconstruction [T, H_kv, d] with the exact outlier and local rows: what sparse
   * attention sees when its budget covers every chunk. Returns a new tensor.
   */
  patchExact(layer: number, full: tf.Tensor3D, kind: 'k' | 'v'): tf.Tensor3D {
    const t = this.tensors(layer);
    if (t.exactIdx.shape[0] === 0) return full;
    return tf.tidy(() => tf.tensorScatterUpdate(full, t.exactIdx, kind === 'k' ? t.exactK : t.exactV) as tf.Tensor3D);
  }

  /**
   * Chunk scores per KV head, [H_kv, C]: for each query row, softmax over the non-outlier chunks of
   * q·landmark/√d; summed over the n query tokens; the maximum over the g query heads of the GQA
   * group (ShadowKV's `get_retrieval_position_ids`; xKV-SR likewise). Outlier chunks score −1e30.
   */
  chunkScores(layer: number, qb: QueryBlocks): tf.Tensor2D {
    const t = this.loopTensors(layer);
    const C = this.index.chunks;
    return tf.tidy(() => {
      const H = t.lt.length;
      let a = tf.stack(t.lt.map((lt, h) => tf.matMul(qb.rows[h], lt)), 0) as tf.Tensor3D; // [H_kv, g·n, C]
      if (t.mask) a = tf.add(a, t.mask);
      const p = tf.reshape(tf.softmax(a, -1), [H, qb.g, qb.n, C]);
      const score = tf.max(tf.sum(p, 2), 1) as tf.Tensor2D;
      // Outlier chunks (already exact) stay below every candidate even when the candidates' mass underflows to 0.
      return t.mask ? (tf.add(score, tf.reshape(t.mask, [H, C])) as tf.Tensor2D) : score;
    });
  }

  /** Number of chunks selected per KV head for a token budget: min(⌊budget / c⌋, C − O). */
  selectedChunks(budget: number): number {
    return Math.max(0, Math.min(Math.floor(budget / this.index.chunkSize), this.index.chunks - this.index.outliers));
  }

  /** The selected chunk indices per KV head, [H_kv, k] int32 (highest score first). */
  selectChunks(layer: number, qb: QueryBlocks, budget: number): tf.Tensor2D | null {
    const k = this.selectedChunks(budget);
    if (k === 0) return null;
    return tf.tidy(() => tf.topk(this.chunkScores(layer, qb), k).indices as tf.Tensor2D);
  }

  /** Rows of src [T, R] at the tokens of the given chunks (c consecutive rows each), [k·c, R]. */
  gatherChunks(src: tf.Tensor2D, chunks: Int32Array | tf.Tensor1D, useHost: boolean): tf.Tensor2D {
    const c = this.index.chunkSize;
    const R = src.shape[1];
    if (useHost && chunks instanceof Int32Array) {
      const view = (tf.backend() as unknown as { typedArrayFromHeap(t: tf.Tensor): Float32Array }).typedArrayFromHeap(src);
      const need = chunks.length * c * R;
      if (this.scratch.length < need) this.scratch = new Float32Array(need);
      const out = this.scratch;
      for (let i = 0; i < chunks.length; i++) out.set(view.subarray(chunks[i] * c * R, (chunks[i] + 1) * c * R), i * c * R);
      // The wasm backend copies the values into its heap at creation, so the scratch is reusable.
      return tf.tensor2d(out.subarray(0, need), [chunks.length * c, R]);
    }
    return tf.tidy(() => {
      const ch = chunks instanceof Int32Array ? tf.tensor1d(chunks, 'int32') : chunks;
      const tok = tf.reshape(tf.add(tf.reshape(tf.mul(ch, tf.scalar(c, 'int32')), [-1, 1]), tf.reshape(tf.range(0, c, 1, 'int32'), [1, c])), [-1]);
      return tf.gather(src, tok) as tf.Tensor2D;
    });
  }

}
