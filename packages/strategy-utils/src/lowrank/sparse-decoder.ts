import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, isHostBackend } from '@kvpack/core';
import type { DecodeState } from './decode-state.js';
import { blockRows, blockRowsOnHost, hostRowsReadable, type Block } from './factor-blocks.js';
import type { QueryBlocks } from './query-blocks.js';
import type { SparseIndex } from './sparse-index.js';

/**
 * One layer's sparse index on the backend at its stored width (float16 packed), arranged once for the
 * decode paths: the landmarks transposed per KV head [H_kv, d, C], and each KV head's exact rows (its
 * outlier tokens, then the local tokens) [H_kv, E₀, d] for keys and for values. The same float16 values
 * as the stored index (only reordered), and the same bytes (up to a word of padding each).
 */
interface SparseLayerHeld {
  lt: HalfTensor;
  exactK: HalfTensor;
  exactV: HalfTensor;
  /** Each KV head's outlier chunk indices, int32 [H_kv, O] (stored in the index as int32), held once the WGSL step needs them; null before that and when O = 0. */
  outliers: tf.Tensor2D | null;
}

/** Per-call tensors of one layer's sparse index (transient: built inside the caller's tf.tidy). */
export interface SparseLayerTensors {
  /** −1e30 at each head's outlier chunks, [H_kv, 1, C]; null without outliers. */
  mask: tf.Tensor3D | null;
  /** All heads' landmarks, transposed, [H_kv, d, C]. */
  ltAll: tf.Tensor3D;
  /** Every head's exact rows' keys / values, [H_kv·E₀, d] (head h at rows h·E₀ …). */
  exactK: tf.Tensor2D;
  exactV: tf.Tensor2D;
}

/** {@link SparseLayerTensors} with per-KV-head tensors for the loop path. */
export interface SparseLoopTensors {
  mask: tf.Tensor3D | null;
  /** Landmarks per KV head, transposed, [d, C]. */
  lt: tf.Tensor2D[];
  /** Exact keys / values per KV head: its outlier tokens then the local tokens, [E₀, d]. */
  kx: tf.Tensor2D[];
  vx: tf.Tensor2D[];
}

/**
 * The device side of a sparse index (sparse-index.ts): per layer, the landmarks and exact rows held on
 * the backend at their stored width (float16 packed; uploaded on first use of the layer, freed with the
 * cache), the per-call tensors unpacked from them, and the chunk selection. The attend paths over it
 * are in sparse-attend.ts.
 */
export class SparseDecoder {
  private readonly perLayer = new Map<number, SparseLayerHeld>();
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

  /** The layer's index on the backend (packed, arranged on the host from the stored bits on first use). */
  private held(layer: number): SparseLayerHeld {
    let t = this.perLayer.get(layer);
    if (t) return t;
    const { nKvHeads: H, headDim: d } = this.state.src.layout;
    const F = H * d;
    const { chunks: C, outliers: O, local, chunkSize: c } = this.index;
    const L = this.index.layers[layer];
    const E0 = this.exactPerHead;
    const lt = new Uint16Array(H * d * C);
    for (let h = 0; h < H; h++) for (let ch = 0; ch < C; ch++) for (let e = 0; e < d; e++) lt[(h * d + e) * C + ch] = L.landmarks[ch * F + h * d + e];
    const arrange = (outl: Uint16Array, loc: Uint16Array) => {
      const x = new Uint16Array(H * E0 * d);
      for (let h = 0; h < H; h++) {
        x.set(outl.subarray(h * O * c * d, (h + 1) * O * c * d), h * E0 * d);
        for (let u = 0; u < local; u++) x.set(loc.subarray(u * F + h * d, u * F + h * d + d), (h * E0 + O * c + u) * d);
      }
      return x;
    };
    const made: HalfTensor[] = [];
    try {
      made.push(HalfTensor.fromBits(lt, [H, d, C]));
      made.push(HalfTensor.fromBits(arrange(L.outlierK, L.localK), [H * E0, d]));
      made.push(HalfTensor.fromBits(arrange(L.outlierV, L.localV), [H * E0, d]));
    } catch (e) {
      for (const m of made) m.dispose();
      throw e;
    }
    // First use may come inside a caller's tf.tidy: the held tensors outlive it.
    for (const m of made) tf.keep(m.packed);
    t = { lt: made[0], exactK: made[1], exactV: made[2], outliers: null };
    this.perLayer.set(layer, t);
    return t;
  }

  /** −1e30 at each head's outlier chunks, [H_kv, 1, C], from the host indices; null without outliers (transient). */
  private mask(layer: number): tf.Tensor3D | null {
    const { nKvHeads: H } = this.state.src.layout;
    const { chunks: C, outliers: O } = this.index;
    if (O === 0) return null;
    const oc = this.index.layers[layer].outlierChunks;
    const m = new Float32Array(H * C);
    for (let h = 0; h < H; h++) for (let k = 0; k < O; k++) m[h * C + oc[h * O + k]] = -1e30;
    return tf.tensor3d(m, [H, 1, C]);
  }

  /** The layer's index as float32 tensors for the batched paths (transient; inside tf.tidy). */
  tensors(layer: number): SparseLayerTensors {
    const held = this.held(layer);
    const unpack = (h: HalfTensor) => (h.size > 0 ? h.unpack() : tf.zeros(h.shape));
    return {
      mask: this.mask(layer),
      ltAll: unpack(held.lt) as tf.Tensor3D,
      exactK: unpack(held.exactK) as tf.Tensor2D,
      exactV: unpack(held.exactV) as tf.Tensor2D,
    };
  }

  /**
   * The layer's index for the WGSL step (transient parts inside tf.tidy): the landmarks as held
   * (float16 packed [H_kv, d, C], read in place by the chunk selection kernel), and the exact rows
   * unpacked (small: [H_kv·E₀, d] each).
   */
  wgslTensors(layer: number): { outliers: tf.Tensor2D | null; lt: HalfTensor; exactK: tf.Tensor2D; exactV: tf.Tensor2D } {
    const held = this.held(layer);
    const { nKvHeads: H } = this.state.src.layout;
    const O = this.index.outliers;
    if (O > 0 && !held.outliers) held.outliers = tf.keep(tf.tensor2d(Int32Array.from(this.index.layers[layer].outlierChunks.subarray(0, H * O)), [H, O], 'int32'));
    const unpack = (h: HalfTensor) => (h.size > 0 ? h.unpack() : tf.zeros(h.shape));
    return { outliers: held.outliers, lt: held.lt, exactK: unpack(held.exactK) as tf.Tensor2D, exactV: unpack(held.exactV) as tf.Tensor2D };
  }

  /**
   * The layer's index as per-KV-head float32 tensors for the loop path (transient; inside tf.tidy):
   * decoded on the host on wasm/cpu (from the packed bits, in place in the wasm heap), else unpacked and
   * split on the device.
   */
  loopTensors(layer: number): SparseLoopTensors {
    const held = this.held(layer);
    const { nKvHeads: H, headDim: d } = this.state.src.layout;
    const C = this.index.chunks;
    const E0 = this.exactPerHead;
    if (!isHostBackend()) {
      const t = this.tensors(layer);
      const heads = <T extends tf.Tensor>(x: tf.Tensor, shape: number[]) => (H === 1 ? [tf.reshape(x, shape) as T] : (tf.unstack(tf.reshape(x, [H, ...shape]), 0) as T[]));
      return { mask: t.mask, lt: heads(t.ltAll, [d, C]), kx: heads(t.exactK, [E0, d]), vx: heads(t.exactV, [E0, d]) };
    }
    // All decoded before any tensor is created (a heap growth would detach the wasm heap views).
    const lt = held.lt.valuesSync('sparse index');
    const k = held.exactK.valuesSync('sparse index');
    const v = held.exactV.valuesSync('sparse index');
    const out: SparseLoopTensors = { mask: this.mask(layer), lt: [], kx: [], vx: [] };
    for (let h = 0; h < H; h++) {
      out.lt.push(tf.tensor2d(lt.subarray(h * d * C, (h + 1) * d * C), [d, C]));
      out.kx.push(tf.tensor2d(k.subarray(h * E0 * d, (h + 1) * E0 * d), [E0, d]));
      out.vx.push(tf.tensor2d(v.subarray(h * E0 * d, (h + 1) * E0 * d), [E0, d]));
    }
    return out;
  }

  /** Frees the layers' held index tensors. */
  dispose(): void {
    for (const t of this.perLayer.values()) {
      t.lt.dispose();
      t.exactK.dispose();
      t.exactV.dispose();
      t.outliers?.dispose();
    }
    this.perLayer.clear();
  }

  /**
   * Overwrites a full reconstruction [T, H_kv, d] with the exact outlier and local rows: what sparse
   * attention sees when its budget covers every chunk. Returns a new tensor.
   */
  patchExact(layer: number, full: tf.Tensor3D, kind: 'k' | 'v'): tf.Tensor3D {
    const { nKvHeads: H } = this.state.src.layout;
    const E0 = this.exactPerHead;
    if (E0 === 0) return full;
    return tf.tidy(() => {
      const idx = new Int32Array(H * E0 * 2);
      for (let h = 0; h < H; h++)
        this.exactTokens(layer, h).forEach((tok, i) => {
          idx[(h * E0 + i) * 2] = tok;
          idx[(h * E0 + i) * 2 + 1] = h;
        });
      const held = this.held(layer);
      const rows = (kind === 'k' ? held.exactK : held.exactV).unpack();
      return tf.tensorScatterUpdate(full, tf.tensor2d(idx, [H * E0, 2], 'int32'), rows) as tf.Tensor3D;
    });
  }

  /**
   * Chunk scores per KV head, [H_kv, C]: for each query row, softmax over the non-outlier chunks of
   * q·landmark/√d; summed over the n query tokens; the maximum over the g query heads of the GQA
   * group (ShadowKV's `get_retrieval_position_ids`; xKV-SR likewise). Outlier chunks score −1e30.
   */
  chunkScores(layer: number, qb: QueryBlocks, loop?: SparseLoopTensors): tf.Tensor2D {
    const C = this.index.chunks;
    return tf.tidy(() => {
      const t = loop ?? this.loopTensors(layer);
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
  selectChunks(layer: number, qb: QueryBlocks, budget: number, loop?: SparseLoopTensors): tf.Tensor2D | null {
    const k = this.selectedChunks(budget);
    if (k === 0) return null;
    return tf.tidy(() => tf.topk(this.chunkScores(layer, qb, loop), k).indices as tf.Tensor2D);
  }

  /** Rows of src [T, R] at the tokens of the given chunks (c consecutive rows each), [k·c, R]. */
  gatherChunks(src: tf.Tensor2D, chunks: Int32Array | tf.Tensor1D, useHost: boolean): tf.Tensor2D {
    const R = src.shape[1];
    if (useHost && chunks instanceof Int32Array) {
      const view = (tf.backend() as unknown as { typedArrayFromHeap(t: tf.Tensor): Float32Array }).typedArrayFromHeap(src);
      return this.gatherHostRows(view, R, chunks);
    }
    return tf.tidy(() => tf.gather(src, this.chunkTokens(chunks)) as tf.Tensor2D);
  }

  /** Rows of a host array [T, width] at the tokens of the given chunks, as a tensor [k·c, width] (wasm: copied at creation). */
  gatherHostRows(src: Float32Array, width: number, chunks: Int32Array): tf.Tensor2D {
    const c = this.index.chunkSize;
    const need = chunks.length * c * width;
    const out = this.buffer(need);
    for (let i = 0; i < chunks.length; i++) out.set(src.subarray(chunks[i] * c * width, (chunks[i] + 1) * c * width), i * c * width);
    // The wasm backend copies the values into its heap at creation, so the scratch is reusable.
    return tf.tensor2d(out.subarray(0, need), [chunks.length * c, width]);
  }

  /**
   * Rows of a stored block [T, R] at the tokens of the given chunks, [k·c, R]: on wasm with host
   * gathers, decoded in place from the packed bits in the heap (only those rows); otherwise gathered
   * from the block's values `dense()` (unpacked once per call by the caller).
   */
  gatherBlockChunks(b: Block, chunks: Int32Array | tf.Tensor1D, useHost: boolean, dense: () => tf.Tensor2D): tf.Tensor2D {
    if (useHost && chunks instanceof Int32Array && hostRowsReadable(b)) {
      const c = this.index.chunkSize;
      const starts = Int32Array.from(chunks, (ch) => ch * c);
      const rows = blockRowsOnHost(b, starts, c, this.buffer(chunks.length * c * b.cols))!;
      return tf.tensor2d(rows, [chunks.length * c, b.cols]);
    }
    if (b.held instanceof HalfTensor && !useHost) return tf.tidy(() => blockRows(b, this.chunkTokens(chunks))); // only those rows unpacked
    return this.gatherChunks(dense(), chunks, useHost);
  }

  /** Token ids of the given chunks (c consecutive tokens each), [k·c] int32. */
  private chunkTokens(chunks: Int32Array | tf.Tensor1D): tf.Tensor1D {
    const c = this.index.chunkSize;
    return tf.tidy(() => {
      const ch = chunks instanceof Int32Array ? tf.tensor1d(chunks, 'int32') : chunks;
      return tf.reshape(tf.add(tf.reshape(tf.mul(ch, tf.scalar(c, 'int32')), [-1, 1]), tf.reshape(tf.range(0, c, 1, 'int32'), [1, c])), [-1]) as tf.Tensor1D;
    });
  }

  private buffer(n: number): Float32Array {
    if (this.scratch.length < n) this.scratch = new Float32Array(n);
    return this.scratch;
  }
}
