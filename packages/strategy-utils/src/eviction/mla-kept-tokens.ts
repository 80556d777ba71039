import * as tf from '@tensorflow/tfjs-core';
import { BaseCompressedMlaCache, HalfTensor, check, ropeSharedKeys, type MlaKVCache, type MlaLayout, type MlaStoredReader, type RopeConfig, type StoredItem } from '@kvpack/core';

/**
 * An MLA latent cache that keeps a subset of the prefill tokens (eviction): per layer, the kept
 * tokens' latents c_KV [n, d_c] and **post-RoPE** shared keys k_R [n, d_R] (rotated at their original
 * positions before eviction, so they keep them), float16 on the backend ({@link HalfTensor}), in
 * ascending position order. The latent is shared by every head, so one set of tokens per layer is
 * kept; its positions are stored (int32 [n]) unless the options imply them.
 */
export class MlaKeptTokensCache extends BaseCompressedMlaCache {
  constructor(
    readonly strategy: string,
    layout: MlaLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly options: unknown,
    private readonly c: HalfTensor[],
    private readonly kr: HalfTensor[],
    private readonly positions: Int32Array[],
    /** Whether the positions are stored (and counted) or implied by the options. */
    private readonly storePositions: boolean,
  ) {
    super(layout, rope, prefillLength);
  }

  /** Prefill positions (0-based token indices) kept in a layer, [n]. */
  keptPositions(layer: number): Int32Array {
    this.assertLive(layer);
    return Int32Array.from(this.positions[layer]);
  }

  protected prefillTokens(layer: number): number {
    return this.c[layer].shape[0];
  }
  protected prefillLatents(layer: number): tf.Tensor2D {
    return this.c[layer].unpack() as tf.Tensor2D;
  }
  protected prefillRopeKeys(layer: number): tf.Tensor2D {
    return this.kr[layer].unpack() as tf.Tensor2D;
  }
  protected stored(): StoredItem[] {
    return this.c.flatMap((c, l): StoredItem[] => [
      { name: `c.${l}`, half: c },
      { name: `kr.${l}`, half: this.kr[l] },
      ...(this.storePositions ? [{ name: `pos.${l}`, dtype: 'int32' as const, shape: [c.shape[0]], data: this.positions[l] }] : []),
    ]);
  }
  protected disposeStored(): void {
    for (const h of [...this.c, ...this.kr]) h.dispose();
  }

  /**
   * Builds the cache layer by layer: the RoPE keys are rotated once (at startPosition + i), `select`
   * picks the kept positions (ascending, [n]) from the layer's latents and post-RoPE keys, or null to
   * keep all T; the kept rows are gathered on the backend and packed to float16.
   */
  static async fromSelection(
    strategy: string,
    options: unknown,
    cache: MlaKVCache,
    T: number,
    storePositions: boolean,
    select: (layer: number, postRopeKeys: tf.Tensor2D) => Promise<Int32Array | null> | Int32Array | null,
  ): Promise<MlaKeptTokensCache> {
    const c: HalfTensor[] = [];
    const kr: HalfTensor[] = [];
    const positions: Int32Array[] = [];
    const pack = async (x: tf.Tensor2D, idx: tf.Tensor1D | null) => {
      const kept = idx ? tf.gather(x, idx, 0) : x;
      try {
        return await HalfTensor.fromTensor(kept);
      } finally {
        if (kept !== x) kept.dispose();
      }
    };
    try {
      for (let l = 0; l < cache.layout.nLayers; l++) {
        const post = ropeSharedKeys(cache.ropeKeys[l], cache.rope, cache.startPosition ?? 0);
        try {
          const sel = await select(l, post);
          check(
            sel === null || sel.every((p, i) => p >= 0 && p < T && (i === 0 || p > sel[i - 1])),
            'shape',
            `${strategy}: kept positions must ascend within [0, ${T})`,
          );
          const idx = sel ? tf.tensor1d(sel, 'int32') : null;
          try {
            c.push(await pack(cache.latents[l], idx));
            kr.push(await pack(post, idx));
          } finally {
            idx?.dispose();
          }
          positions.push(sel ?? Int32Array.from({ length: T }, (_, i) => i));
        } finally {
          post.dispose();
        }
      }
      return new MlaKeptTokensCache(strategy, cache.layout, cache.rope, T, options, c, kr, positions, storePositions);
    } catch (e) {
      for (const h of [...c, ...kr]) h.dispose();
      throw e;
    }
  }

  /**
   * Restores a serialized cache of `strategy`; `impliedPositions` gives the positions when they were
   * not stored. @throws KvpackError('corrupt')
   */
  static restore(r: MlaStoredReader, strategy: string, options: unknown, impliedPositions?: (T: number) => Int32Array): MlaKeptTokensCache {
    const { layout, rope, prefillLength: T } = r.header;
    const c: HalfTensor[] = [];
    const kr: HalfTensor[] = [];
    const positions: Int32Array[] = [];
    for (let l = 0; l < layout.nLayers; l++) {
      const n = r.shape(`c.${l}`, { dtype: 'float16', shape: [null, layout.kvLoraRank] })[0];
      const pos = impliedPositions ? impliedPositions(T) : r.host<Int32Array>(`pos.${l}`, { dtype: 'int32', shape: [n] });
      check(pos.length === n, 'corrupt', `serialized ${strategy} MLA cache is corrupt: layer ${l} keeps ${n} tokens, its options imply ${pos.length}`);
      check(pos.every((p, i) => p >= 0 && p < T && (i === 0 || p > pos[i - 1])), 'corrupt', `serialized ${strategy} MLA cache is corrupt: "pos.${l}" holds positions outside [0, ${T}) or out of order`);
      c.push(r.half(`c.${l}`, { shape: [n, layout.kvLoraRank] }));
      kr.push(r.half(`kr.${l}`, { shape: [n, layout.qkRopeHeadDim] }));
      positions.push(pos);
    }
    return new MlaKeptTokensCache(strategy, layout, rope, T, options, c, kr, positions, !impliedPositions);
  }
}
