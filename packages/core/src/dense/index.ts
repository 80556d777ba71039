import * as tf from '@tensorflow/tfjs-core';
import { z } from 'zod';
import { BaseCompressedCache, restoreStored, roundToHalf, type StoredItem } from '../cache.js';
import { applyRope } from '../rope.js';
import { registerStrategy } from '../registry.js';
import type { CompressedCache, KVCache, ModelLayout, RopeConfig, Strategy } from '../types.js';
import { validateKVCache } from '../validate.js';

/** Options of the `dense` strategy. */
export const DenseOptionsSchema = z.strictObject({
  /** Storage precision: float16 (what serving systems keep; ratio 1.0) or float32 (bit-exact). */
  storage: z.enum(['float16', 'float32']).default('float16'),
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
    private readonly k: tf.Tensor3D[],
    private readonly v: tf.Tensor3D[],
    private readonly startPosition: number,
  ) {
    super(layout, rope, prefillLength);
  }
  protected prefillKeys(layer: number): tf.Tensor3D {
    return applyRope(this.k[layer], this.rope, { start: this.startPosition, count: this.prefillLength });
  }
  protected prefillValues(layer: number): tf.Tensor3D {
    return tf.clone(this.v[layer]);
  }
  protected stored(): StoredItem[] {
    const dtype = this.options.storage;
    return this.k.flatMap((k, l) => [
      { name: `k.${l}`, tensor: k, dtype },
      { name: `v.${l}`, tensor: this.v[l], dtype },
    ]);
  }
  protected meta(): Record<string, unknown> {
    return { startPosition: this.startPosition };
  }
  protected disposeStored(): void {
    tf.dispose([...this.k, ...this.v]);
  }

  /** Restores a serialized dense cache. @throws KvpackError('corrupt' | 'truncated') */
  static fromBytes(bytes: Uint8Array, options: DenseOptions): DenseCache {
    return restoreStored(bytes, 'dense', ({ header: h, tensor }) => {
      const expect = { dtype: options.storage, shape: [h.prefillLength, h.layout.nKvHeads, h.layout.headDim] };
      const layers = Array.from({ length: h.layout.nLayers }, (_, l) => l);
      const k = layers.map((l) => tensor<tf.Tensor3D>(`k.${l}`, expect));
      const v = layers.map((l) => tensor<tf.Tensor3D>(`v.${l}`, expect));
      return new DenseCache(h.layout, h.rope, h.prefillLength, options, k, v, h.startPosition);
    });
  }
}

/** Builds the `dense` strategy. */
export function denseStrategy(options: DenseOptions): Strategy<DenseOptions> {
  return {
    name: 'dense',
    options,
    async compress(cache: KVCache): Promise<CompressedCache> {
      const T = await validateKVCache(cache);
      const round = async (x: tf.Tensor3D) => (options.storage === 'float16' ? ((await roundToHalf(x)) as tf.Tensor3D) : (tf.clone(x) as tf.Tensor3D));
      const k: tf.Tensor3D[] = [];
      const v: tf.Tensor3D[] = [];
      try {
        for (let l = 0; l < cache.layout.nLayers; l++) {
          k.push(await round(cache.keys[l]));
          v.push(await round(cache.values[l]));
        }
      } catch (e) {
        // Nothing of a failed compress stays allocated.
        tf.dispose([...k, ...v]);
        throw e;
      }
      return new DenseCache(cache.layout, cache.rope, T, options, k, v, cache.startPosition ?? 0);
    },
    deserialize: (bytes) => DenseCache.fromBytes(bytes, options),
  };
}

registerStrategy({
  name: 'dense',
  description: 'uncompressed reference cache (float16 or float32 storage)',
  schema: DenseOptionsSchema,
  create: denseStrategy,
});
