import * as tf from '@tensorflow/tfjs-core';
import { z } from 'zod';
import { BaseCompressedCache, type StoredItem } from '../cache.js';
import { HalfTensor, disposeHeld, heldRowPrefix, heldValues, holdFloat, type HeldFloat } from '../half.js';
import { defineStrategy, disposeOwnedOnError } from '../define.js';
import { KvpackError } from '../errors.js';
import { applyRope } from '../rope.js';
import type { ModelLayout, RopeConfig, Strategy } from '../types.js';
import { BaseCompressedMlaCache, ropeSharedKeys, type MlaLayout } from '../mla.js';

/** Options of the `dense` strategy. */
export const DenseOptionsSchema = z.strictObject({
  /** Storage precision: float16 (what serving systems keep; ratio 1.0) or float32 (bit-exact). */
  storage: z.enum(['float16', 'float32']).default('float16').describe('Storage precision: float16 (ratio 1.0, what serving systems keep) or float32 (bit-exact).'),
});
export type DenseOptions = z.output<typeof DenseOptionsSchema>;

/**
 * The uncompressed reference: keeps every prefill token's pre-RoPE keys and values, rotating keys
 * at read time. Its measured ratio is 1.0 at float16 storage and 0.5 at float32.
 */
export class DenseCache extends BaseCompressedCache {
  readonly strategy = 'dense';
  constructor(
    layout: ModelLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly options: DenseOptions,
    /** Pre-RoPE keys per layer, [T, H_kv, d], at the storage precision (float16 packed two per int32). */
    private readonly k: HeldFloat[],
    /** Values per layer, [T, H_kv, d], likewise. */
    private readonly v: HeldFloat[],
    private readonly startPosition: number,
  ) {
    super(layout, rope, prefillLength);
  }
  protected prefillKeys(layer: number): tf.Tensor3D {
    return tf.tidy(() => applyRope(heldValues<tf.Tensor3D>(this.k[layer]), this.rope, { start: this.startPosition, count: this.prefillLength }));
  }
  protected prefillValues(layer: number): tf.Tensor3D {
    return heldValues<tf.Tensor3D>(this.v[layer]);
  }
  protected stored(): StoredItem[] {
    return this.k.flatMap((k, l) => [
      { name: `k.${l}`, held: k },
      { name: `v.${l}`, held: this.v[l] },
    ]);
  }
  protected meta(): Record<string, unknown> {
    return { startPosition: this.startPosition };
  }
  protected disposeStored(): void {
    [...this.k, ...this.v].forEach(disposeHeld);
  }

  /**
   * The cache cut to its first `tokens` tokens: every layer's stored rows [0, t) (t = min(tokens, T)),
   * bit for bit, then the first tokens − T exact decode tokens. A new cache; this one stays usable.
   * @throws KvpackError('shape') for tokens outside [1, tokenCount].
   */
  cutPrefix(tokens: number): Promise<DenseCache> {
    return this.cutWith(tokens, (t) =>
      disposeOwnedOnError(async (own) => {
        const cut = async (h: HeldFloat) => {
          const c = await heldRowPrefix(h, t);
          own(c instanceof HalfTensor ? c.packed : c);
          return c;
        };
        const k: HeldFloat[] = [];
        const v: HeldFloat[] = [];
        for (let l = 0; l < this.layout.nLayers; l++) {
          k.push(await cut(this.k[l]));
          v.push(await cut(this.v[l]));
        }
        return new DenseCache(this.layout, this.rope, t, this.options, k, v, this.startPosition);
      }),
    );
  }
}

/**
 * The uncompressed MLA reference: every prefill token's latent c_KV [T, d_c] and pre-RoPE shared key
 * k_R [T, d_R] at the storage precision, the key rotated at read time. Ratio 1.0 at float16 storage.
 */
export class DenseMlaCache extends BaseCompressedMlaCache {
  readonly strategy = 'dense';
  constructor(
    layout: MlaLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly options: DenseOptions,
    /** Latents per layer, [T, d_c], at the storage precision. */
    private readonly c: HeldFloat[],
    /** Pre-RoPE shared keys per layer, [T, d_R], likewise. */
    private readonly kr: HeldFloat[],
    private readonly startPosition: number,
  ) {
    super(layout, rope, prefillLength);
  }
  protected prefillLatents(layer: number): tf.Tensor2D {
    return heldValues<tf.Tensor2D>(this.c[layer]);
  }
  protected prefillRopeKeys(layer: number): tf.Tensor2D {
    return tf.tidy(() => ropeSharedKeys(heldValues<tf.Tensor2D>(this.kr[layer]), this.rope, this.startPosition));
  }
  protected stored(): StoredItem[] {
    return this.c.flatMap((c, l) => [
      { name: `c.${l}`, held: c },
      { name: `kr.${l}`, held: this.kr[l] },
    ]);
  }
  protected meta(): Record<string, unknown> {
    return { startPosition: this.startPosition };
  }
  protected disposeStored(): void {
    [...this.c, ...this.kr].forEach(disposeHeld);
  }
}

/** The `dense` reference strategy: every prefill token's keys and values at the storage precision. */
export const denseDefinition = defineStrategy({
  name: 'dense',
  description: 'uncompressed reference cache (float16 or float32 storage)',
  schema: DenseOptionsSchema,
  compress: (cache, options, T) =>
    disposeOwnedOnError(async (own) => {
      const hold = async (x: tf.Tensor3D) => {
        const h = await holdFloat(x, options.storage);
        own(h instanceof HalfTensor ? h.packed : h);
        return h;
      };
      const k: HeldFloat[] = [];
      const v: HeldFloat[] = [];
      for (let l = 0; l < cache.layout.nLayers; l++) {
        k.push(await hold(cache.keys[l]));
        v.push(await hold(cache.values[l]));
      }
      return new DenseCache(cache.layout, cache.rope, T, options, k, v, cache.startPosition ?? 0);
    }),
  restore: ({ header: h, held }, options) => {
    const expect = { dtype: options.storage, shape: [h.prefillLength, h.layout.nKvHeads, h.layout.headDim] };
    const layers = Array.from({ length: h.layout.nLayers }, (_, l) => l);
    const k = layers.map((l) => held(`k.${l}`, expect));
    const v = layers.map((l) => held(`v.${l}`, expect));
    return new DenseCache(h.layout, h.rope, h.prefillLength, options, k, v, h.startPosition);
  },
  capabilities: {
    mla: (options) => ({
      compress: (cache, T) =>
        disposeOwnedOnError(async (own) => {
          const hold = async (x: tf.Tensor2D) => {
            const h = await holdFloat(x, options.storage);
            own(h instanceof HalfTensor ? h.packed : h);
            return h;
          };
          const c: HeldFloat[] = [];
          const kr: HeldFloat[] = [];
          for (let l = 0; l < cache.layout.nLayers; l++) {
            c.push(await hold(cache.latents[l]));
            kr.push(await hold(cache.ropeKeys[l]));
          }
          return new DenseMlaCache(cache.layout, cache.rope, T, options, c, kr, cache.startPosition ?? 0);
        }),
      restore: ({ header: h, held }) => {
        const layers = Array.from({ length: h.layout.nLayers }, (_, l) => l);
        const c = layers.map((l) => held(`c.${l}`, { dtype: options.storage, shape: [h.prefillLength, h.layout.kvLoraRank] }));
        const kr = layers.map((l) => held(`kr.${l}`, { dtype: options.storage, shape: [h.prefillLength, h.layout.qkRopeHeadDim] }));
        return new DenseMlaCache(h.layout, h.rope, h.prefillLength, options, c, kr, h.startPosition);
      },
    }),
    // Every token's keys and values are its own rows: any prefix is exact.
    cutPrefix: () => (cache, tokens) => {
      if (!(cache instanceof DenseCache)) throw new KvpackError('shape', `dense cut: expected a dense cache, got a ${cache.strategy} cache`);
      return cache.cutPrefix(tokens);
    },
  },
});

/** Builds the `dense` strategy at the given options (no registry lookup). */
export function denseStrategy(options: DenseOptions): Strategy<DenseOptions> {
  return denseDefinition.create(options) as Strategy<DenseOptions>;
}
