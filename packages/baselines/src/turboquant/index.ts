import * as tf from '@tensorflow/tfjs-core';
import { BaseCompressedCache, KvpackError, applyRope, check, defineStrategy, denseCacheBytes, type KVCache, type ModelLayout, type RopeConfig, type StoredItem, type StoredReader } from '@kvpack/core';
import { z } from 'zod';
import {
  CodesTensor,
  codesItem,
  disposeRotationCodes,
  hadamardSigns,
  lloydMaxCodebook,
  qjlMatrix,
  resolveKnobByTarget,
  rotationQuantize,
  rotationReconstruct,
  type CodebookBits,
  type RotationCodes,
  type RotationSetup,
} from '@kvpack/strategy-utils';

const codebookBits = z.union([z.literal(1), z.literal(2), z.literal(4)]);

/** Codebook bits when neither they nor targetRatio are given. */
const DEFAULT_BITS = 2;

/** Options of the `turboquant` strategy. */
export const TurboQuantOptionsSchema = z
  .strictObject({
    /** Codebook bits per key coordinate (1, 2 or 4); the QJL sketch adds one more bit per coordinate. */
    keyBits: codebookBits.optional().describe('Lloyd–Max codebook bits per rotated key coordinate: 1, 2 or 4 (default 2; the QJL sketch adds 1 bit per coordinate; excludes targetRatio).'),
    /** Codebook bits per value coordinate (1, 2 or 4). */
    valueBits: codebookBits.optional().describe('Lloyd–Max codebook bits per rotated value coordinate: 1, 2 or 4 (default 2; excludes targetRatio).'),
    /**
     * Target ratio (dense fp16 bytes ÷ bytes held) instead of keyBits and valueBits: of the nine
     * (keyBits, valueBits) pairs, the one with the most bytes (ties: more key bits) whose measured
     * ratio is ≥ the target ({@link resolveTurboQuantOptions}). Excludes keyBits and valueBits;
     * `compressionRatio` (kvpress's fraction removed) is accepted for it.
     */
    targetRatio: z
      .number()
      .min(1)
      .max(1e9)
      .optional()
      .describe('Target ratio (dense fp16 bytes ÷ bytes held) instead of keyBits/valueBits: the (keyBits, valueBits) pair with the most bytes reaching it (ties: more key bits).'),
    /** Store the keys' 1-bit QJL sketch of the residual and its norm, for an unbiased inner-product estimate. */
    qjl: z.boolean().default(true).describe('Keys: add the 1-bit QJL sign sketch of the quantization residual and its norm (unbiased attention logits).'),
    /** Seed of the random sign flips and of the QJL projection (derived per layer; not stored). */
    seed: z.int().nonnegative().max(2 ** 31 - 1).default(0).describe('Seed of the random Hadamard sign flips and of the QJL Gaussian projection.'),
  })
  .refine((o) => o.targetRatio === undefined || (o.keyBits === undefined && o.valueBits === undefined), {
    message: 'give keyBits/valueBits or targetRatio, not both',
    path: ['targetRatio'],
  });
export type TurboQuantOptions = z.output<typeof TurboQuantOptionsSchema>;
/** {@link TurboQuantOptions} with the codebook bits fixed (what a cache records). */
export type ResolvedTurboQuantOptions = Omit<TurboQuantOptions, 'targetRatio'> & { keyBits: CodebookBits; valueBits: CodebookBits };

/**
 * Bytes a {@link TurboQuantCache} holds right after compress at T tokens: per layer, with N = T·H_kv
 * rows of head_dim d, the packed key codes ⌈N·d·keyBits/8⌉ and float16 norms 2N, with QJL the packed
 * sign bits ⌈N·d/8⌉ and float16 residual norms 2N, then the packed value codes ⌈N·d·valueBits/8⌉ and
 * float16 norms 2N.
 */
export function turboQuantCacheBytes(layout: ModelLayout, T: number, o: ResolvedTurboQuantOptions): number {
  const N = T * layout.nKvHeads;
  const d = layout.headDim;
  const key = Math.ceil((N * d * o.keyBits) / 8) + 2 * N + (o.qjl ? Math.ceil((N * d) / 8) + 2 * N : 0);
  const value = Math.ceil((N * d * o.valueBits) / 8) + 2 * N;
  return layout.nLayers * (key + value);
}

/** The nine (keyBits, valueBits) pairs, most bits first (ties: more key bits), as a target ratio tries them. */
export const TURBOQUANT_BIT_PAIRS: readonly (readonly [CodebookBits, CodebookBits])[] = ([1, 2, 4] as const)
  .flatMap((k) => ([1, 2, 4] as const).map((v) => [k, v] as const))
  .sort((a, b) => b[0] + b[1] - (a[0] + a[1]) || b[0] - a[0]);

/**
 * The options with the codebook bits fixed for a prefill of T tokens: as given (2 by default), or —
 * with a targetRatio ρ — the first pair of {@link TURBOQUANT_BIT_PAIRS} whose
 * {@link turboQuantCacheBytes} · ρ ≤ dense fp16 bytes (the measured ratio right after compress is then
 * ≥ ρ). The result records the bits, not the target.
 * @throws KvpackError('config') when 1-bit keys and values do not reach ρ, naming the reachable range.
 */
export function resolveTurboQuantOptions(o: TurboQuantOptions, layout: ModelLayout, T: number): ResolvedTurboQuantOptions {
  const { targetRatio, ...rest } = o;
  if (targetRatio === undefined) return { ...rest, keyBits: (o.keyBits ?? DEFAULT_BITS) as CodebookBits, valueBits: (o.valueBits ?? DEFAULT_BITS) as CodebookBits };
  const [keyBits, valueBits] = resolveKnobByTarget({
    strategy: 'turboquant',
    knob: 'keyBits/valueBits',
    target: targetRatio,
    tokens: T,
    denseBytes: denseCacheBytes(layout, T),
    candidates: TURBOQUANT_BIT_PAIRS,
    bytesOf: ([k, v]) => turboQuantCacheBytes(layout, T, { ...rest, keyBits: k, valueBits: v }),
  });
  return { ...rest, keyBits, valueBits };
}

/** Seed of one random stream (0 key rotation, 1 value rotation, 2 QJL projection) of one layer. */
function streamSeed(seed: number, layer: number, stream: number): number {
  return (Math.imul(seed ^ 0x5bd1e995, 0x9e3779b1) ^ Math.imul(layer + 1, 0x85ebca6b) ^ Math.imul(stream + 1, 0xc2b2ae35)) >>> 0;
}

/**
 * The rotations, codebooks and QJL projection of one layer: keys and values each get their own
 * sign flips (d values ±1), the QJL projection S is d × d (m = d sketch bits per key), all derived from
 * the seed and the layer.
 */
export function turboQuantSetup(o: ResolvedTurboQuantOptions, d: number, layer: number): { key: RotationSetup; value: RotationSetup } {
  return {
    key: {
      signs: hadamardSigns(streamSeed(o.seed, layer, 0), d),
      codebook: lloydMaxCodebook(d, o.keyBits),
      bits: o.keyBits,
      ...(o.qjl ? { qjl: { S: qjlMatrix(streamSeed(o.seed, layer, 2), d, d), m: d } } : {}),
    },
    value: { signs: hadamardSigns(streamSeed(o.seed, layer, 1), d), codebook: lloydMaxCodebook(d, o.valueBits), bits: o.valueBits },
  };
}

/**
 * A rotation-quantized cache: per layer the T·H_kv key rows and value rows of head_dim d, each stored
 * as a float16 norm and bit-packed codebook codes of the randomly rotated unit row; keys also as the
 * packed QJL sign bits (d per row) and the float16 residual norm. `keys(layer)` reconstructs
 * x̂ + ‖r‖·√(π/2)/d·Sᵀz, so that the attention logits q·k̃ are the QJL estimator of q·k; `values(layer)`
 * reconstructs x̂. Bytes per layer: T·H_kv·(⌈d·b_k/8⌉-ish packed codes + 2 + (d/8 + 2 with QJL)) for
 * keys and the same without the sketch for values, packed over the whole layer.
 */
export class TurboQuantCache extends BaseCompressedCache {
  readonly strategy = 'turboquant';
  private readonly setups: { key: RotationSetup; value: RotationSetup }[];
  constructor(
    layout: ModelLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly options: ResolvedTurboQuantOptions,
    private readonly k: RotationCodes[],
    private readonly v: RotationCodes[],
  ) {
    super(layout, rope, prefillLength);
    this.setups = Array.from({ length: layout.nLayers }, (_, l) => turboQuantSetup(options, layout.headDim, l));
  }

  /** The quantized key and value rows of a layer, as held (not copies; do not dispose). */
  quantized(layer: number): { keys: RotationCodes; values: RotationCodes; setup: { key: RotationSetup; value: RotationSetup } } {
    this.assertLive(layer);
    return { keys: this.k[layer], values: this.v[layer], setup: this.setups[layer] };
  }

  protected prefillKeys(layer: number): tf.Tensor3D {
    const { nKvHeads: H, headDim: d } = this.layout;
    return tf.tidy(() => tf.reshape(rotationReconstruct(this.k[layer], this.setups[layer].key), [this.prefillLength, H, d]) as tf.Tensor3D);
  }
  protected prefillValues(layer: number): tf.Tensor3D {
    const { nKvHeads: H, headDim: d } = this.layout;
    return tf.tidy(() => tf.reshape(rotationReconstruct(this.v[layer], this.setups[layer].value), [this.prefillLength, H, d]) as tf.Tensor3D);
  }
  protected stored(): StoredItem[] {
    return this.k.flatMap((k, l): StoredItem[] => {
      const v = this.v[l];
      return [
        codesItem(`k.codes.${l}`, k.codes),
        { name: `k.norm.${l}`, half: k.norms },
        ...(k.signs ? [codesItem(`k.sign.${l}`, k.signs), { name: `k.rnorm.${l}`, half: k.residualNorms! }] : []),
        codesItem(`v.codes.${l}`, v.codes),
        { name: `v.norm.${l}`, half: v.norms },
      ];
    });
  }
  protected disposeStored(): void {
    for (const q of [...this.k, ...this.v]) disposeRotationCodes(q);
  }

  /**
   * Restores a serialized cache; options with a target ratio resolve the bits again from the header's T and layout.
   * @throws KvpackError('corrupt') when the file disagrees with the options.
   */
  static restore(r: StoredReader, given: TurboQuantOptions): TurboQuantCache {
    const { layout, rope, prefillLength: T } = r.header;
    let o: ResolvedTurboQuantOptions;
    try {
      o = resolveTurboQuantOptions(given, layout, T);
    } catch (e) {
      throw new KvpackError('corrupt', `serialized turboquant cache is corrupt: its options give no bits at T = ${T} (${(e as Error).message})`);
    }
    const { nKvHeads: H, headDim: d } = layout;
    const N = T * H;
    const k: RotationCodes[] = [];
    const v: RotationCodes[] = [];
    const made: { dispose(): void }[] = [];
    const own = <X extends { dispose(): void }>(x: X) => (made.push(x), x);
    const codes = (name: string, bits: 1 | 2 | 4, count: number) =>
      own(CodesTensor.fromBytes(r.host<Uint8Array>(name, { dtype: 'uint8', shape: [Math.ceil((count * bits) / 8)] }), bits, count));
    try {
      for (let l = 0; l < layout.nLayers; l++) {
        const kc = codes(`k.codes.${l}`, o.keyBits, N * d);
        const kn = own(r.half(`k.norm.${l}`, { shape: [N] }));
        const sk = o.qjl ? { signs: codes(`k.sign.${l}`, 1, N * d), residualNorms: own(r.half(`k.rnorm.${l}`, { shape: [N] })) } : {};
        k.push({ rows: N, dim: d, bits: o.keyBits, codes: kc, norms: kn, ...sk });
        v.push({ rows: N, dim: d, bits: o.valueBits, codes: codes(`v.codes.${l}`, o.valueBits, N * d), norms: own(r.half(`v.norm.${l}`, { shape: [N] })) });
      }
    } catch (e) {
      for (const m of made) m.dispose();
      throw e;
    }
    return new TurboQuantCache(layout, rope, T, o, k, v);
  }
}

/**
 * The `turboquant` strategy: rotation quantization after TurboQuant (Zandieh et al. 2025, arXiv
 * 2504.19874, §3: random rotation, per-coordinate Lloyd–Max codebook for the rotated coordinates'
 * Beta distribution; §3.2: TurboQuant_prod, the 1-bit QJL sketch of the residual for inner products)
 * and QJL (Zandieh et al. 2024, arXiv 2406.03482, Lemma 3.2: the unbiased sign-sketch estimator). The
 * rotation is a randomized Hadamard transform (seeded sign flips, then a fast Walsh–Hadamard transform
 * over head_dim), so head_dim must be a power of two. Every token is kept: per layer the post-RoPE keys
 * and the values [T, H_kv, d] are quantized row by row on the backend and held bit-packed (see
 * {@link TurboQuantCache}); decode tokens are appended exactly. A `targetRatio` resolves the bits per
 * T and layout ({@link resolveTurboQuantOptions}).
 *
 * `compress` throws KvpackError('config') when head_dim is not a power of two or a target ratio is
 * out of reach, KvpackError('layout' |
 * 'shape' | 'dtype' | 'nonfinite') on a bad cache.
 */
export const turboQuantDefinition = defineStrategy({
  name: 'turboquant',
  description: 'TurboQuant/QJL: random Hadamard rotation, Lloyd–Max codebook per coordinate, 1-bit QJL residual sketch for keys (Zandieh et al. 2024–2025)',
  schema: TurboQuantOptionsSchema,
  capabilities: { ratioTarget: (o) => (o.targetRatio === undefined ? null : { target: o.targetRatio, knob: 'keyBits/valueBits' }) },
  async compress(cache: KVCache, given, T) {
    const { nLayers: L, nKvHeads: H, headDim: d } = cache.layout;
    check((d & (d - 1)) === 0 && d >= 2, 'config', `turboquant: head_dim ${d} is not a power of two (the Walsh–Hadamard rotation needs one)`);
    const o = resolveTurboQuantOptions(given, cache.layout, T);
    const k: RotationCodes[] = [];
    const v: RotationCodes[] = [];
    try {
      for (let l = 0; l < L; l++) {
        const setup = turboQuantSetup(o, d, l);
        const post = tf.tidy(() => tf.reshape(applyRope(cache.keys[l], cache.rope, { start: cache.startPosition ?? 0, count: T }), [T * H, d]) as tf.Tensor2D);
        try {
          k.push(await rotationQuantize(post, setup.key));
        } finally {
          post.dispose();
        }
        const vals = tf.reshape(cache.values[l], [T * H, d]) as tf.Tensor2D;
        try {
          v.push(await rotationQuantize(vals, setup.value));
        } finally {
          vals.dispose();
        }
      }
    } catch (e) {
      for (const q of [...k, ...v]) disposeRotationCodes(q);
      throw e;
    }
    return new TurboQuantCache(cache.layout, cache.rope, T, o, k, v);
  },
  restore: (reader, o) => TurboQuantCache.restore(reader, o),
});
