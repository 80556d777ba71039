import * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedCache,
  applyRope,
  defineStrategy,
  denseCacheBytes,
  type ModelLayout,
  type RopeConfig,
  type StoredItem,
} from '@kvpack/core';
import {
  dequantizeHeld,
  disposeHeldQuantized,
  heldQuantizedItems,
  holdQuantized,
  quantizeMatrix,
  quantizedBytes,
  readQuantized,
  resolveBitsOption,
  type HeldQuantized,
  type QuantSpec,
} from '@kvpack/strategy-utils';
import { z } from 'zod';

/** Options of the `quant` strategy. */
export const QuantOptionsSchema = z.strictObject({
  /** Bits per code: 8 (int8) or 4 (int4, two codes per byte). */
  bits: z.union([z.literal(8), z.literal(4)], { error: 'bits must be 8 or 4' }).optional().describe('Bits per code (8 or 4; default 8; excludes targetRatio).'),
  /**
   * `symmetric`: one 16-bit scale per group, codes in [−2^(b−1), 2^(b−1) − 1].
   * `asymmetric`: a 16-bit scale and an integer zero point (1 byte) per group, codes in [0, 2^b − 1].
   */
  mode: z.enum(['symmetric', 'asymmetric']).default('symmetric').describe('Symmetric (scale only) or asymmetric (scale + zero point) per token and KV head.'),
  /**
   * Target ratio (dense fp16 bytes ÷ bytes held) instead of bits: the most bits (8, then 4) whose
   * measured bytes reach it ({@link resolveQuantOptions}). Excludes bits; `compressionRatio` is accepted for it.
   */
  targetRatio: z.number().min(1).max(1e9).optional().describe('Target ratio (dense fp16 bytes ÷ bytes held) instead of bits: the most bits (8, then 4) reaching it.'),
}).refine((o) => o.bits === undefined || o.targetRatio === undefined, { message: 'give bits or targetRatio, not both', path: ['targetRatio'] });
export type QuantOptions = z.output<typeof QuantOptionsSchema>;

/**
 * The options with bits fixed for a prefill of T tokens: as given, or 8 by default, or — with a
 * targetRatio ρ — the most bits of 8 and 4 whose {@link quantCacheBytes} · ρ ≤ dense fp16 bytes (the
 * measured ratio right after compress is then ≥ ρ). The result records bits, not the target.
 * @throws KvpackError('config') when 4 bits do not reach ρ, naming the reachable range.
 */
export function resolveQuantOptions(options: QuantOptions, layout: ModelLayout, T: number): QuantOptions & { bits: 8 | 4 } {
  return resolveBitsOption({
    strategy: 'quant',
    options,
    fallback: 8,
    tokens: T,
    denseBytes: denseCacheBytes(layout, T),
    candidates: [8, 4] as const,
    bytesOf: (b) => quantCacheBytes(layout, T, { ...options, bits: b }),
  });
}

/** The quantization spec of one token's one KV head: a group of d channels. */
export function perTokenSpec(options: QuantOptions, headDim: number): QuantSpec {
  return { bits: options.bits ?? 8, quantGroupSize: headDim, symmetric: options.mode === 'symmetric' };
}

/**
 * Bytes the `quant` strategy holds for a prefill of T tokens (decode tokens excluded): per layer, for
 * keys and for values, the packed codes ⌈T·H_kv·d·bits/8⌉, a 16-bit scale per token per KV head, and
 * (asymmetric) a 1-byte zero point per token per KV head.
 */
export function quantCacheBytes(layout: ModelLayout, tokens: number, options: QuantOptions): number {
  const rows = tokens * layout.nKvHeads;
  return 2 * layout.nLayers * quantizedBytes(rows, layout.headDim, perTokenSpec(options, layout.headDim));
}

/**
 * A per-token int8/int4 cache. Per layer it holds on the backend, in their stored form, the quantized
 * pre-RoPE keys and values: packed codes, float16 scales and (asymmetric) 8-bit zero points — what
 * `serialize` writes and `byteSize` counts, and nothing more. Keys and values are dequantized per
 * call (`dequantizeHeld`, bit-identical to the host `dequantizeMatrix`); keys are rotated at
 * read time, at positions startPosition + i.
 */
export class QuantCache extends BaseCompressedCache {
  readonly strategy = 'quant';
  constructor(
    layout: ModelLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly options: QuantOptions,
    private readonly qk: HeldQuantized[],
    private readonly qv: HeldQuantized[],
    private readonly startPosition: number,
  ) {
    super(layout, rope, prefillLength);
  }

  private dequantized(h: HeldQuantized): tf.Tensor3D {
    const { nKvHeads: H, headDim: d } = this.layout;
    const T = this.prefillLength;
    return tf.tidy(() => tf.reshape(dequantizeHeld(h), [T, H, d]));
  }

  protected prefillKeys(layer: number): tf.Tensor3D {
    return tf.tidy(() => applyRope(this.dequantized(this.qk[layer]), this.rope, { start: this.startPosition, count: this.prefillLength }));
  }
  protected prefillValues(layer: number): tf.Tensor3D {
    return this.dequantized(this.qv[layer]);
  }
  protected stored(): StoredItem[] {
    return this.qk.flatMap((k, l): StoredItem[] => [...heldQuantizedItems(`k.${l}`, k), ...heldQuantizedItems(`v.${l}`, this.qv[l])]);
  }
  protected meta(): Record<string, unknown> {
    return { startPosition: this.startPosition };
  }
  protected disposeStored(): void {
    [...this.qk, ...this.qv].forEach(disposeHeldQuantized);
  }
}

/**
 * The `quant` strategy: per-token integer quantization of the prefill cache. Each token's
 * vector of one KV head (d channels of pre-RoPE keys, or of values) is one quantization group with a
 * 16-bit scale (and, asymmetric, an integer zero point); codes are rounded half-to-even and
 * bit-packed (int4: two per byte). This is the "per-token" KV quantization baseline (as in
 * FlexGen / KIVI's fake-quant ablations); the quantizer is `quantizeMatrix` of @kvpack/strategy-utils (the
 * xKV authors' `xKV/customized_cache/quant.py` scheme) with rows = T·H_kv and group = d.
 * Keys are quantized pre-RoPE (what the KVCache holds) and rotated at read time. Decode-time tokens
 * stay exact (float32) in the residual buffer.
 * `compress` throws KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache.
 */
export const quantDefinition = defineStrategy({
  name: 'quant',
  description: 'per-token int8/int4 quantization of keys (pre-RoPE) and values, 16-bit scale per token per KV head',
  schema: QuantOptionsSchema,
  capabilities: {
    ratioTarget: (o) => (o.targetRatio === undefined ? null : { target: o.targetRatio, knob: 'bits' }),
    mla: () => 'its groups are one KV head’s d channels of a token; for MLA latent caches use kivi (latent quantization)',
  },
  async compress(cache, given, T) {
    const options = resolveQuantOptions(given, cache.layout, T);
    const { nKvHeads, headDim } = cache.layout;
    const spec = perTokenSpec(options, headDim);
    const qk: HeldQuantized[] = [];
    const qv: HeldQuantized[] = [];
    try {
      for (let l = 0; l < cache.layout.nLayers; l++) {
        // Quantized on the host, uploaded packed: no float32 copy stays on the backend.
        qk.push(holdQuantized(quantizeMatrix((await cache.keys[l].data()) as Float32Array, T * nKvHeads, headDim, spec)));
        qv.push(holdQuantized(quantizeMatrix((await cache.values[l].data()) as Float32Array, T * nKvHeads, headDim, spec)));
      }
    } catch (e) {
      [...qk, ...qv].forEach(disposeHeldQuantized);
      throw e;
    }
    return new QuantCache(cache.layout, cache.rope, T, options, qk, qv, cache.startPosition ?? 0);
  },
  restore(r, given) {
    const { layout, rope, prefillLength, startPosition } = r.header;
    const options = resolveQuantOptions(given, layout, prefillLength);
    const spec = perTokenSpec(options, layout.headDim);
    // The stored bytes are uploaded as they are (codes and zero points packed, scales float16).
    const load = (name: string): HeldQuantized => holdQuantized(readQuantized(r, name, prefillLength * layout.nKvHeads, layout.headDim, spec));
    const layers = Array.from({ length: layout.nLayers }, (_, l) => l);
    return new QuantCache(layout, rope, prefillLength, options, layers.map((l) => load(`k.${l}`)), layers.map((l) => load(`v.${l}`)), startPosition);
  },
});
