import * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedCache,
  KvpackError,
  MAX_FEATURES,
  MAX_TOKENS,
  applyRope,
  atMost,
  check,
  checkKV,
  HalfTensor,
  defineStrategy,
  denseCacheBytes,
  type ModelLayout,
  type RopeConfig,
  type StoredItem,
} from '@kvpack/core';
import { concatHalfRows, holdMinMaxOnBackend, dropHalfRows, resolveBitsOption, type HeldMinMax, type MinMaxGrouping } from '@kvpack/strategy-utils';
import { z } from 'zod';
import { HeldMinMaxBlocks } from './held.js';
import { kiviMlaCompressor } from './mla.js';

/** Options of the `kivi` strategy (defaults as in jy-yuan/KIVI's scripts: 2 bits, g = 32, R = 128). */
export const KiviOptionsSchema = z
  .strictObject({
    /** Bits per code, for keys and values: 2 (KIVI-2) or 4 (KIVI-4). */
    bits: z.union([z.literal(2), z.literal(4)], { error: 'bits must be 2 or 4' }).optional().describe('Bits per code for keys and values: 2 (KIVI-2, default) or 4 (KIVI-4); excludes targetRatio.'),
    /**
     * Group size g: keys are grouped over g tokens per channel, values over g channels per token; at
     * most 2^16 (core MAX_FEATURES: g divides head_dim, itself at most a layer's H_kv·d features).
     */
    quantGroupSize: z.int().positive().max(MAX_FEATURES, { error: atMost(MAX_FEATURES, 'g divides head_dim') }).default(32).describe('Group size g in elements: keys grouped over g tokens per channel, values over g channels per token; divides head_dim.'),
    /** Full-precision (16-bit) residual window R, in tokens; a multiple of g; at most 2^20 (core MAX_TOKENS). */
    residualLength: z.int().positive().max(MAX_TOKENS, { error: atMost(MAX_TOKENS, "tokens; 2^20 tokens of one layer's keys already fill the wasm heap") }).default(128).describe('Full-precision (float16) residual window R in tokens; a multiple of quantGroupSize.'),
    /**
     * Target ratio (dense fp16 bytes ÷ bytes held) instead of bits: the most bits (4, then 2) whose
     * measured bytes reach it at the actual T ({@link resolveKiviOptions}; the float16 window counts).
     * Excludes bits; `compressionRatio` is accepted for it.
     */
    targetRatio: z.number().min(1).max(1e9).optional().describe('Target ratio (dense fp16 bytes ÷ bytes held) instead of bits: the most bits (4, then 2) reaching it at the actual T.'),
  })
  .refine((o) => o.bits === undefined || o.targetRatio === undefined, { message: 'give bits or targetRatio, not both', path: ['targetRatio'] })
  .refine((o) => o.residualLength % o.quantGroupSize === 0, {
    message: 'residualLength (R) must be a multiple of quantGroupSize (g), as KIVI quantizes keys R tokens at a time in groups of g',
    path: ['residualLength'],
  });
export type KiviOptions = z.output<typeof KiviOptionsSchema>;

/**
 * The options with bits fixed for a prefill of T tokens: as given, or 2 by default, or — with a
 * targetRatio ρ — the most bits of 4 and 2 whose {@link kiviCacheBytes} · ρ ≤ dense fp16 bytes (the
 * measured ratio right after compress is then ≥ ρ). The result records bits, not the target.
 * @throws KvpackError('config') when 2 bits do not reach ρ (the float16 window of residualLength
 *   tokens bounds the ratio at short T), naming the reachable range.
 */
export function resolveKiviOptions(options: KiviOptions, layout: ModelLayout, T: number): KiviOptions & { bits: 2 | 4 } {
  return resolveBitsOption({
    strategy: 'kivi',
    options,
    fallback: 2,
    tokens: T,
    denseBytes: denseCacheBytes(layout, T),
    candidates: [4, 2] as const,
    bytesOf: (b) => kiviCacheBytes(layout, T, { ...options, bits: b }),
  });
}

/**
 * What one layer of a KIVI cache holds on the backend, all in its stored form: the quantized keys and
 * values (packed codes, float16 scale and min per group) and the float16 full-precision windows.
 */
interface KiviLayer {
  /** Quantized post-RoPE key tokens (a multiple of R): codes [nk, H, d], scale/min [nk/g, H, d]. */
  k: HeldMinMaxBlocks;
  /** Full-precision post-RoPE key window, float16 [r_k, H, d], or null. */
  kWin: HalfTensor | null;
  /** Quantized value tokens: codes [nv, H, d], scale/min [nv, H, d/g]. */
  v: HeldMinMaxBlocks;
  /** Full-precision value window, float16 [r_v, H, d], or null. */
  vWin: HalfTensor | null;
}

function rows(x: HalfTensor | null): number {
  return x ? x.shape[0] : 0;
}

function disposeBlock(b: HeldMinMax): void {
  b.codes.dispose();
  b.scale.dispose();
  b.min.dispose();
}

/** Rows [from, to) of a float32 [T, H, d] tensor quantized on the backend; its non-finite flag joins `flags`. */
function quantizeRows(x: tf.Tensor3D, from: number, to: number, p: { along: MinMaxGrouping; H: number; d: number; g: number; bits: 2 | 4 }, flags: tf.Scalar[]): HeldMinMax {
  const part = from === 0 && to === x.shape[0] ? x : tf.slice(x, [from, 0, 0], [to - from, p.H, p.d]);
  try {
    const { nonFinite, ...held } = holdMinMaxOnBackend({ ...p, n: to - from }, part);
    flags.push(nonFinite);
    return held;
  } finally {
    if (part !== x) part.dispose();
  }
}

/** Rows [from, to) of a float32 [T, H, d] tensor rounded to float16 and packed (on the device on webgpu). */
async function windowOf(x: tf.Tensor3D, from: number, to: number): Promise<HalfTensor> {
  const part = tf.slice(x, [from, 0, 0], [to - from, x.shape[1], x.shape[2]]);
  try {
    return await HalfTensor.fromTensor(part);
  } finally {
    part.dispose();
  }
}

/**
 * A float16 window without its first `drop` rows, then `add` (float32 [n, H, d]) rounded to float16:
 * a new tensor, on the backend (the window is not disposed).
 */
function nextWindow(win: HalfTensor | null, drop: number, add: tf.Tensor3D): HalfTensor {
  const added = HalfTensor.fromTensorSync(add);
  if (!win || drop >= rows(win)) return added;
  let kept: HalfTensor | null = null;
  try {
    kept = drop === 0 ? win : dropHalfRows(win, drop);
    return concatHalfRows(kept, added);
  } finally {
    added.dispose();
    if (kept !== win) kept?.dispose();
  }
}

function disposeLayer(s: KiviLayer): void {
  s.k.dispose();
  s.v.dispose();
  s.kWin?.dispose();
  s.vWin?.dispose();
}

/** An empty layer: keys grouped over g tokens per channel (merged block by block), values over g channels per token (a tail of up to R tokens). */
function emptyLayer(options: KiviOptions, H: number, d: number): KiviLayer {
  const { bits = 2, quantGroupSize: g, residualLength: R } = options;
  return {
    k: new HeldMinMaxBlocks({ along: 'tokens', bits, H, d, g, tailTokens: R }),
    kWin: null,
    v: new HeldMinMaxBlocks({ along: 'channels', bits, H, d, g, tailTokens: R }),
    vWin: null,
  };
}

/**
 * Bytes a KIVI cache holds right after compressing a prefill of T tokens: per layer,
 * keys: ⌈n_k·H_kv·d·b/8⌉ code bytes + 2·2 bytes (scale, min) per group of g tokens of each channel +
 * 2 bytes per element of the r_k = T mod R window tokens (n_k = T − r_k);
 * values: ⌈n_v·H_kv·d·b/8⌉ + 2·2 bytes per group of g channels of each token + 2 bytes per element
 * of the last r_v = min(T, R) tokens (n_v = T − r_v).
 */
export function kiviCacheBytes(layout: ModelLayout, tokens: number, options: KiviOptions): number {
  const { nKvHeads: H, headDim: d, nLayers: L } = layout;
  const { bits: b = 2, quantGroupSize: g, residualLength: R } = options;
  const rk = tokens % R;
  const nk = tokens - rk;
  const rv = Math.min(tokens, R);
  const nv = tokens - rv;
  const keys = Math.ceil((nk * H * d * b) / 8) + 4 * (nk / g) * H * d + 2 * rk * H * d;
  const values = Math.ceil((nv * H * d * b) / 8) + 4 * nv * H * (d / g) + 2 * rv * H * d;
  return L * (keys + values);
}

/**
 * A KIVI cache (Liu et al. 2024, arXiv 2402.02750, §3–4; reference jy-yuan/KIVI,
 * models/llama_kivi.py): keys quantized per channel, values per token, both asymmetric min–max at
 * 2 or 4 bits with float16 scale and minimum per group, plus a float16 full-precision window.
 *
 * Keys are **post-RoPE**, as in the reference (it quantizes the Hugging Face cache, which holds
 * rotated keys); prefill keys are rotated at their positions before quantization and decode keys
 * arrive rotated, so both are treated alike.
 *
 * **append() differs from {@link BaseCompressedCache}**: decode tokens are not kept exact in a
 * float32 residual; they join KIVI's float16 windows, which are quantized as in the reference:
 * - keys: once the key window holds R tokens, those R tokens are quantized as one block (R/g groups
 *   per channel) and the window restarts;
 * - values: the window keeps the newest R tokens; each older token is quantized on its own as the
 *   window slides.
 * The reference quantizes at the end of a decode step, after that step's attention; here that
 * happens at the start of the next `append`, so every step still attends to its newest R (keys) and
 * R + 1 (values) tokens in full precision, exactly as the reference does.
 */
export class KiviCache extends BaseCompressedCache {
  readonly strategy = 'kivi';

  constructor(
    layout: ModelLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly options: KiviOptions,
    private readonly state: KiviLayer[],
  ) {
    super(layout, rope, prefillLength);
  }

  /** Quantized key tokens of a layer (n_k; a multiple of R). */
  quantizedKeyTokens(layer: number): number {
    this.assertLive(layer);
    return this.state[layer].k.tokens;
  }
  /** Quantized value tokens of a layer (n_v). */
  quantizedValueTokens(layer: number): number {
    this.assertLive(layer);
    return this.state[layer].v.tokens;
  }

  protected prefillTokens(layer: number): number {
    return this.quantizedKeyTokens(layer) + rows(this.state[layer].kWin);
  }

  /** Dequantized block and unpacked window, joined: transient float32 [n, H, d]. */
  private joined(q: HeldMinMaxBlocks, win: HalfTensor | null): tf.Tensor3D {
    return tf.tidy(() => {
      const parts = [q.dequantize(), win ? (win.unpack() as tf.Tensor3D) : null].filter((x): x is tf.Tensor3D => x !== null);
      return parts.length === 1 ? parts[0] : tf.concat(parts, 0);
    });
  }
  protected prefillKeys(layer: number): tf.Tensor3D {
    return this.joined(this.state[layer].k, this.state[layer].kWin);
  }
  protected prefillValues(layer: number): tf.Tensor3D {
    return this.joined(this.state[layer].v, this.state[layer].vWin);
  }

  /**
   * Appends decode tokens (post-RoPE keys and values, [n, H_kv, d]) to KIVI's float16 windows, first
   * quantizing what the previous appends left beyond them (see the class comment). Decode tokens are
   * therefore rounded to float16 and later quantized; they are not kept exact. Everything runs on the
   * backend (no readback on webgpu): the windows stay packed float16, a flush quantizes with tf ops
   * ({@link holdMinMaxOnBackend}). A decode token beyond the float16 range is held as ±Inf in the
   * window (as a float16 cache would); the group it is later quantized in then dequantizes to NaN/Inf,
   * as checking for it would need a readback. Nothing changes if it throws.
   * @throws KvpackError('shape' | 'dtype' | 'disposed')
   */
  override append(layer: number, keys: tf.Tensor3D, values: tf.Tensor3D): void {
    this.assertLive(layer);
    checkKV(keys, this.layout, `append(layer ${layer}) keys`);
    checkKV(values, this.layout, `append(layer ${layer}) values`, keys.shape[0]);
    const s = this.state[layer];
    const { nKvHeads: H, headDim: d } = this.layout;
    const { bits = 2, quantGroupSize: g, residualLength: R } = this.options;
    // Keys: a window of R or more tokens is quantized R at a time; values: beyond R, the oldest tokens.
    const rk = rows(s.kWin);
    const nk = rk >= R ? Math.floor(rk / R) * R : 0;
    const rv = rows(s.vWin);
    const nv = rv > R ? rv - R : 0;
    const quantize = (win: HalfTensor, n: number, along: MinMaxGrouping): HeldMinMax => {
      const x = tf.tidy(() => tf.slice(win.unpack(), [0, 0, 0], [n, H, d]));
      try {
        const b = holdMinMaxOnBackend({ along, n, H, d, g, bits }, x);
        b.nonFinite.dispose(); // window values are float16 already, and so are their groups' scale and minimum
        return b;
      } finally {
        x.dispose();
      }
    };
    const made: HeldMinMax[] = [];
    let kNext: HalfTensor | null = null;
    let vNext: HalfTensor | null = null;
    try {
      if (nk > 0) made.push(quantize(s.kWin!, nk, 'tokens'));
      if (nv > 0) made.push(quantize(s.vWin!, nv, 'channels'));
      kNext = nextWindow(s.kWin, nk, keys);
      vNext = nextWindow(s.vWin, nv, values);
    } catch (e) {
      made.forEach(disposeBlock);
      kNext?.dispose();
      throw e;
    }
    try {
      // A push takes its block (and frees it if it fails).
      if (nk > 0) s.k.push(made.shift()!);
      if (nv > 0) s.v.push(made.shift()!);
    } catch (e) {
      made.forEach(disposeBlock);
      kNext.dispose();
      vNext.dispose();
      throw e;
    }
    s.kWin?.dispose();
    s.vWin?.dispose();
    s.kWin = kNext;
    s.vWin = vNext;
  }

  protected stored(): StoredItem[] {
    const { nKvHeads: H, headDim: d } = this.layout;
    const win = (name: string, x: HalfTensor | null): StoredItem => (x ? { name, half: x } : { name, dtype: 'float16', shape: [0, H, d], data: new Uint16Array(0) });
    return this.state.flatMap((s, l): StoredItem[] => [...s.k.items(`k.${l}`), win(`k.${l}.window`, s.kWin), ...s.v.items(`v.${l}`), win(`v.${l}.window`, s.vWin)]);
  }


  protected disposeStored(): void {
    this.state.forEach(disposeLayer);
  }
}

/**
 * The `kivi` strategy. At prefill (T tokens), per layer: the first T − (T mod R) post-RoPE keys are
 * quantized per channel in groups of g tokens and the last T mod R stay in the float16 key window;
 * all but the last R values are quantized per token in groups of g channels and the last min(T, R)
 * stay in the float16 value window (jy-yuan/KIVI, models/llama_kivi.py, prefill branch).
 * `compress` throws KvpackError('shape') when head_dim is not a multiple of g, and
 * KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache (a group beyond the float16
 * range of its scale included); a failed compress frees what it built. On MLA latent caches the
 * latents and RoPE keys are quantized per channel like keys, decode tokens too, R at a time (mla.ts).
 */
export const kiviDefinition = defineStrategy({
  name: 'kivi',
  description: 'KIVI: 2/4-bit asymmetric quantization, keys per channel and values per token, with a 16-bit residual window (Liu et al. 2024)',
  schema: KiviOptionsSchema,
  renamedOptions: { groupSize: 'quantGroupSize' },
  capabilities: {
    ratioTarget: (o) => (o.targetRatio === undefined ? null : { target: o.targetRatio, knob: 'bits' }),
    // MLA latent caches: the latents and post-RoPE shared keys quantized per channel like KIVI's keys (mla.ts).
    mla: (o) => (o.targetRatio !== undefined ? 'a target ratio is not resolved on MLA latent caches; give bits' : kiviMlaCompressor({ ...o, bits: o.bits ?? 2 })),
    cutPrefix: (o) =>
      `kivi quantizes keys per channel over groups of ${o.quantGroupSize} tokens with one scale and zero point per group, and keeps the last tokens in a float16 window: a prefix ending inside a key group would need that group's codes re-quantized, which changes the stored numbers; store and restore whole prefixes`,
  },
  async compress(cache, given, T) {
    const options = resolveKiviOptions(given, cache.layout, T);
    const { nKvHeads: H, headDim: d } = cache.layout;
    const { bits = 2, quantGroupSize: g, residualLength: R } = options;
    check(d % g === 0, 'shape', `kivi: head_dim ${d} is not a multiple of quantGroupSize ${g} (values are quantized in groups of g channels)`);
    const state: KiviLayer[] = [];
    const flags: tf.Scalar[] = [];
    try {
      // Quantized and packed on the backend (no host round trip): no float32 copy stays there.
      for (let l = 0; l < cache.layout.nLayers; l++) {
        const s = emptyLayer(options, H, d);
        state.push(s);
        const post = applyRope(cache.keys[l], cache.rope, { start: cache.startPosition ?? 0, count: T });
        try {
          const nk = T - (T % R);
          if (nk > 0) s.k.push(quantizeRows(post, 0, nk, { along: 'tokens', H, d, g, bits }, flags));
          if (nk < T) s.kWin = await windowOf(post, nk, T);
        } finally {
          post.dispose();
        }
        const nv = Math.max(0, T - R);
        if (nv > 0) s.v.push(quantizeRows(cache.values[l], 0, nv, { along: 'channels', H, d, g, bits }, flags));
        s.vWin = await windowOf(cache.values[l], nv, T);
      }
      // One readback for the whole cache: did a group reach beyond the float16 range of its scale and minimum?
      const any = flags.length > 0 ? tf.tidy(() => tf.max(tf.stack(flags))) : null;
      const bad = any ? await any.data().finally(() => any.dispose()) : [0];
      if (bad[0] !== 0) throw new KvpackError('nonfinite', 'kivi: a quantization group spans a range beyond the float16 range (±65504) of its scale and minimum');
    } catch (e) {
      state.forEach(disposeLayer);
      throw e;
    } finally {
      tf.dispose(flags);
    }
    return new KiviCache(cache.layout, cache.rope, T, options, state);
  },
  restore(r, given) {
    const { layout, rope, prefillLength } = r.header;
    const options = resolveKiviOptions(given, layout, prefillLength);
    const { nKvHeads: H, headDim: d } = layout;
    const { bits = 2, quantGroupSize: g, residualLength: R } = options;
    check(d % g === 0, 'corrupt', `serialized kivi cache is corrupt: head_dim ${d} is not a multiple of its group size ${g}`);
    const state: KiviLayer[] = [];
    // The stored bytes are uploaded as they are (codes packed, scale, min and windows float16).
    for (let l = 0; l < layout.nLayers; l++) {
      // Keys: per-channel groups of g tokens, [nk/g, H, d] scales; values: per-token groups of g channels, [nv, H, d/g].
      const nk = r.shape(`k.${l}.scale`, { dtype: 'float16', shape: [null, H, d] })[0] * g;
      const nv = r.shape(`v.${l}.scale`, { dtype: 'float16', shape: [null, H, d / g] })[0];
      const blocks = (name: string, along: MinMaxGrouping, tokens: number, groupShape: number[]) =>
        HeldMinMaxBlocks.fromStored(
          { along, bits, H, d, g, tailTokens: R },
          {
            tokens,
            codes: r.host<Uint8Array>(`${name}.codes`, { dtype: 'uint8', shape: [Math.ceil((tokens * H * d * bits) / 8)] }),
            scale: r.host<Uint16Array>(`${name}.scale`, { dtype: 'float16', shape: groupShape }),
            min: r.host<Uint16Array>(`${name}.min`, { dtype: 'float16', shape: groupShape }),
          },
        );
      const window = (name: string) => {
        const rowsHeld = r.shape(name, { dtype: 'float16', shape: [null, H, d] })[0];
        return rowsHeld > 0 ? r.half(name, { shape: [rowsHeld, H, d] }) : null;
      };
      state.push({
        k: blocks(`k.${l}`, 'tokens', nk, [nk / g, H, d]),
        kWin: window(`k.${l}.window`),
        v: blocks(`v.${l}`, 'channels', nv, [nv, H, d / g]),
        vWin: window(`v.${l}.window`),
      });
    }
    return new KiviCache(layout, rope, prefillLength, options, state);
  },
});
export { KiviMlaCache, kiviMlaCacheBytes, kiviMlaCompressor } from './mla.js';
