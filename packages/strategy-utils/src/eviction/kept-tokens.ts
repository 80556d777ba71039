import * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedCache,
  HalfTensor,
  applyRope,
  check,
  encodeHalf,
  type KVCache,
  type ModelLayout,
  type RopeConfig,
  type StoredItem,
  type StoredReader,
  isWebGpuBackend,
} from '@kvpack/core';
import { gatherRowsPackedWgsl } from './gather-wgsl.js';

/**
 * Gathers the kept tokens of one layer, per KV head, as float16 bit patterns: x is [T, H, d]
 * (row-major), `positions` is [n, H] (kept token of row j for head h at positions[j·H + h]). Returns
 * [n, H, d] rounded half to even, ready for {@link HalfTensor.fromBits}.
 */
export function gatherPerHeadBits(x: Float32Array, H: number, d: number, positions: Int32Array): Uint16Array {
  return encodeHalf(gatherRows(x, H, d, positions));
}

/** The per-head gather of {@link gatherPerHeadBits}, unrounded. */
function gatherRows(x: Float32Array, H: number, d: number, positions: Int32Array): Float32Array {
  const n = positions.length / H;
  const out = new Float32Array(n * H * d);
  for (let j = 0; j < n; j++) {
    for (let h = 0; h < H; h++) {
      const src = (positions[j * H + h] * H + h) * d;
      out.set(x.subarray(src, src + d), (j * H + h) * d);
    }
  }
  return out;
}

/**
 * A cache that keeps a subset of the prefill tokens (eviction), possibly a different subset per KV
 * head with the same count: per layer, float16 post-RoPE keys and values of the kept tokens, in
 * ascending position order, [n, H_kv, d], held on the backend as float16 ({@link HalfTensor}, packed
 * two per int32: what is stored, no float32 copy; reads unpack transiently). Kept keys were rotated
 * at their original positions, so they keep them (no re-rotation). Shared by `streamingllm` (same tokens for every head, positions
 * implied by its options) and `snapkv` (per-head positions, stored as int32 [n, H_kv]).
 */
export class KeptTokensCache extends BaseCompressedCache {
  constructor(
    readonly strategy: string,
    layout: ModelLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly options: unknown,
    private readonly k: HalfTensor[],
    private readonly v: HalfTensor[],
    private readonly positions: Int32Array[],
    /** Whether the positions are stored (and counted) or implied by the options. */
    private readonly storePositions: boolean,
  ) {
    super(layout, rope, prefillLength);
  }

  /** Prefill positions (0-based token indices) kept in a layer, [n, H_kv] row-major. */
  keptPositions(layer: number): Int32Array {
    this.assertLive(layer);
    return Int32Array.from(this.positions[layer]);
  }

  protected prefillTokens(layer: number): number {
    return this.k[layer].shape[0];
  }
  protected prefillKeys(layer: number): tf.Tensor3D {
    return this.k[layer].unpack() as tf.Tensor3D;
  }
  protected prefillValues(layer: number): tf.Tensor3D {
    return this.v[layer].unpack() as tf.Tensor3D;
  }
  protected stored(): StoredItem[] {
    return this.k.flatMap((k, l): StoredItem[] => [
      { name: `k.${l}`, half: k },
      { name: `v.${l}`, half: this.v[l] },
      ...(this.storePositions ? [{ name: `pos.${l}`, dtype: 'int32' as const, shape: [k.shape[0], k.shape[1]], data: this.positions[l] }] : []),
    ]);
  }
  protected disposeStored(): void {
    for (const h of [...this.k, ...this.v]) h.dispose();
  }

  /**
   * Builds the cache from a prefill and the kept positions of each layer ([n, H_kv] row-major, the
   * same n for every head). See {@link fromSelection}.
   */
  static async fromPositions(strategy: string, options: unknown, cache: KVCache, T: number, positions: Int32Array[], storePositions: boolean): Promise<KeptTokensCache> {
    return KeptTokensCache.fromSelection(strategy, options, cache, T, storePositions, (l) => positions[l]);
  }

  /**
   * Builds the cache from a prefill, layer by layer: the keys are rotated once (at startPosition + i),
   * `select` picks the kept positions from them — host [n, H_kv] row-major, a backend int32 tensor
   * [H_kv, n] (ascending per head; handed over, disposed here), or null to keep all T — and the kept
   * rows of every KV head are gathered on the backend in one batched gather and packed to float16
   * ({@link HalfTensor.fromTensor}). The positions chosen on the backend come back to the host in one
   * small readback after the last layer (int32 [n, H_kv] per layer: what is serialized and what
   * {@link keptPositions} returns), so no layer waits on the host.
   */
  static async fromSelection(
    strategy: string,
    options: unknown,
    cache: KVCache,
    T: number,
    storePositions: boolean,
    select: (layer: number, postKeys: tf.Tensor3D) => Promise<Int32Array | tf.Tensor2D | null> | Int32Array | tf.Tensor2D | null,
  ): Promise<KeptTokensCache> {
    const { nKvHeads: H, nLayers: L } = cache.layout;
    const k: HalfTensor[] = [];
    const v: HalfTensor[] = [];
    /** Per layer: host positions [n, H], or the backend's [n, H] int32 until the final readback. */
    const positions: (Int32Array | tf.Tensor2D)[] = [];
    try {
      for (let l = 0; l < L; l++) {
        const post = applyRope(cache.keys[l], cache.rope, { start: cache.startPosition ?? 0, count: T }) as tf.Tensor3D;
        try {
          const sel = await select(l, post);
          if (sel === null) {
            positions.push(repeatAll(T, H));
            k.push(await HalfTensor.fromTensor(post));
            v.push(await HalfTensor.fromTensor(cache.values[l]));
            continue;
          }
          if (sel instanceof tf.Tensor) positions.push(tf.transpose(sel) as tf.Tensor2D);
          else positions.push(sel);
          let idx: tf.Tensor2D | tf.Tensor1D;
          if (sel instanceof tf.Tensor) idx = sel;
          else {
            const n = sel.length / H;
            const shared = sel.every((p, i) => p === sel[i - (i % H)]);
            // The same tokens for every head (StreamingLLM): one gather of whole rows.
            idx = shared ? tf.tensor1d(Int32Array.from({ length: n }, (_, j) => sel[j * H]), 'int32') : (tf.tidy(() => tf.transpose(tf.tensor2d(sel, [n, H], 'int32'))) as tf.Tensor2D);
          }
          try {
            k.push(await gatherPacked(post, idx));
            v.push(await gatherPacked(cache.values[l], idx));
          } finally {
            idx.dispose();
          }
        } finally {
          post.dispose();
        }
      }
      // Every layer's backend positions in one readback.
      const onBackend = positions.filter((p): p is tf.Tensor2D => p instanceof tf.Tensor);
      let flat = new Int32Array(0);
      if (onBackend.length) {
        const joined = onBackend.length === 1 ? onBackend[0] : tf.tidy(() => tf.concat(onBackend.map((p) => tf.reshape(p, [-1]))));
        try {
          flat = Int32Array.from((await joined.data()) as Int32Array);
        } finally {
          if (joined !== onBackend[0]) joined.dispose();
        }
      }
      let at = 0;
      const host = positions.map((p) => {
        if (!(p instanceof tf.Tensor)) return p;
        const part = flat.subarray(at, at + p.size);
        at += p.size;
        return Int32Array.from(part);
      });
      tf.dispose(positions.filter((p): p is tf.Tensor2D => p instanceof tf.Tensor));
      return new KeptTokensCache(strategy, cache.layout, cache.rope, T, options, k, v, host, storePositions);
    } catch (e) {
      // Nothing of a failed compress stays allocated.
      for (const h of [...k, ...v]) h.dispose();
      tf.dispose(positions.filter((p): p is tf.Tensor2D => p instanceof tf.Tensor));
      throw e;
    }
  }

  /**
   * Restores a serialized cache of `strategy` through its reader; `impliedPositions` gives the
   * positions when they were not stored. @throws KvpackError('corrupt')
   */
  static restore(r: StoredReader, strategy: string, options: unknown, impliedPositions?: (T: number, H: number) => Int32Array): KeptTokensCache {
    const { layout, rope, prefillLength: T } = r.header;
    const { nKvHeads: H, headDim: d } = layout;
    const k: HalfTensor[] = [];
    const v: HalfTensor[] = [];
    const positions: Int32Array[] = [];
    for (let l = 0; l < layout.nLayers; l++) {
      const n = r.shape(`k.${l}`, { dtype: 'float16', shape: [null, H, d] })[0];
      const pos = impliedPositions ? impliedPositions(T, H) : r.host<Int32Array>(`pos.${l}`, { dtype: 'int32', shape: [n, H] });
      check(pos.length === n * H, 'corrupt', `serialized ${strategy} cache is corrupt: layer ${l} keeps ${n} tokens, its options imply ${pos.length / H}`);
      check(pos.every((p) => p >= 0 && p < T), 'corrupt', `serialized ${strategy} cache is corrupt: "pos.${l}" holds a position outside [0, ${T})`);
      k.push(r.half(`k.${l}`, { shape: [n, H, d] }));
      v.push(r.half(`v.${l}`, { shape: [n, H, d] }));
      positions.push(pos);
    }
    return new KeptTokensCache(strategy, layout, rope, T, options, k, v, positions, !impliedPositions);
  }
}

/** All T positions for each of H heads, [T, H] row-major. */
function repeatAll(T: number, H: number): Int32Array {
  const out = new Int32Array(T * H);
  for (let t = 0; t < T; t++) out.fill(t, t * H, (t + 1) * H);
  return out;
}

/**
 * The kept rows of x [T, H, d] packed to float16, [n, H, d]: `idx` [H, n] gives each KV head's own
 * tokens (one gather of rows t·H + h of x viewed as [T·H, d], every head at once), or [n] the same
 * tokens for every head. On webgpu one kernel gathers, rounds and packs ({@link gatherRowsPackedWgsl}).
 */
async function gatherPacked(x: tf.Tensor, idx: tf.Tensor): Promise<HalfTensor> {
  if (isWebGpuBackend() && x.dtype === 'float32') return gatherRowsPackedWgsl(x, idx);
  const [T, H, d] = x.shape;
  const kept = tf.tidy(() => {
    if (idx.rank === 1) return tf.gather(x, idx, 0);
    const n = idx.shape[1]!;
    const rows = tf.add(tf.mul(tf.transpose(idx), tf.scalar(H, 'int32')), tf.reshape(tf.range(0, H, 1, 'int32'), [1, H])); // [n, H]
    return tf.reshape(tf.gather(tf.reshape(x, [T * H, d]), tf.reshape(rows, [n * H])), [n, H, d]);
  });
  try {
    return await HalfTensor.fromTensor(kept);
  } finally {
    kept.dispose();
  }
}
