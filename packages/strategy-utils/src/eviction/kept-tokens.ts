import * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedCache,
  HalfTensor,
  applyRope,
  isHostBackend,
  check,
  encodeHalf,
  type KVCache,
  type ModelLayout,
  type RopeConfig,
  type StoredItem,
  type StoredReader,
} from '@kvpack/core';

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
   * same n for every head). Keys are rotated at startPosition + i before the gather. On wasm and cpu
   * the gather runs on the host (a readback there is a copy) and uploads only the kept float16 bits;
   * on other backends it runs on the device (one gather per KV head's rows, then the float16 pack),
   * with no host round trip.
   */
  static async fromPositions(strategy: string, options: unknown, cache: KVCache, T: number, positions: Int32Array[], storePositions: boolean): Promise<KeptTokensCache> {
    const { nKvHeads: H, headDim: d } = cache.layout;
    const k: HalfTensor[] = [];
    const v: HalfTensor[] = [];
    try {
      for (let l = 0; l < cache.layout.nLayers; l++) {
        const n = positions[l].length / H;
        const rotate = () => applyRope(cache.keys[l], cache.rope, { start: cache.startPosition ?? 0, count: T });
        if (!isHostBackend()) {
          // On a device backend: gather per KV head and pack there; only the positions are uploaded.
          k.push(await gatherOnDevice(rotate, positions[l], n, H));
          v.push(await gatherOnDevice(() => tf.clone(cache.values[l]), positions[l], n, H));
          continue;
        }
        const post = rotate();
        let kd: Float32Array;
        try {
          kd = (await post.data()) as Float32Array;
        } finally {
          post.dispose();
        }
        k.push(HalfTensor.fromBits(gatherPerHeadBits(kd, H, d, positions[l]), [n, H, d]));
        v.push(HalfTensor.fromBits(gatherPerHeadBits((await cache.values[l].data()) as Float32Array, H, d, positions[l]), [n, H, d]));
      }
      return new KeptTokensCache(strategy, cache.layout, cache.rope, T, options, k, v, positions, storePositions);
    } catch (e) {
      // Nothing of a failed compress stays allocated.
      for (const h of [...k, ...v]) h.dispose();
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

/**
 * Rows positions[j·H + h] of head h of x [T, H, d] (built by `make`, disposed here), gathered on the
 * device into [n, H, d] and packed to float16.
 */
async function gatherOnDevice(make: () => tf.Tensor, positions: Int32Array, n: number, H: number): Promise<HalfTensor> {
  const kept = tf.tidy(() => {
    const x = make(); // [T, H, d]
    const byHead = tf.transpose(x, [1, 0, 2]); // [H, T, d]
    const idx = tf.transpose(tf.tensor2d(positions, [n, H], 'int32')); // [H, n]
    return tf.transpose(tf.gather(byHead, idx, 1, 1), [1, 0, 2]); // [n, H, d]
  });
  try {
    return await HalfTensor.fromTensor(kept);
  } finally {
    kept.dispose();
  }
}
