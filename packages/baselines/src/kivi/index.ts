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
  decodeHalf,
  fromHalfBits,
  defineStrategy,
  disposeOwnedOnError,
  roundHalf,
  readSyncOrExplain,
  toHalfBits,
  type ModelLayout,
  type RopeConfig,
  type StoredItem,
} from '@kvpack/core';
import { HalfArray, PackedCodes, roundHalfEven } from '@kvpack/strategy-utils';
import { z } from 'zod';


/** Options of the `kivi` strategy (defaults as in jy-yuan/KIVI's scripts: 2 bits, g = 32, R = 128). */
export const KiviOptionsSchema = z
  .strictObject({
    /** Bits per code, for keys and values: 2 (KIVI-2) or 4 (KIVI-4). */
    bits: z.union([z.literal(2), z.literal(4)], { error: 'bits must be 2 or 4' }).default(2),
    /**
     * Group size g: keys are grouped over g tokens per channel, values over g channels per token; at
     * most 2^16 (core MAX_FEATURES: g divides head_dim, itself at most a layer's H_kv·d features).
     */
    quantGroupSize: z.int().positive().max(MAX_FEATURES, { error: atMost(MAX_FEATURES, 'g divides head_dim') }).default(32),
    /** Full-precision (16-bit) residual window R, in tokens; a multiple of g; at most 2^20 (core MAX_TOKENS). */
    residualLength: z.int().positive().max(MAX_TOKENS, { error: atMost(MAX_TOKENS, "tokens; 2^20 tokens of one layer's keys already fill the wasm heap") }).default(128),
  })
  .refine((o) => o.residualLength % o.quantGroupSize === 0, {
    message: 'residualLength (R) must be a multiple of quantGroupSize (g), as KIVI quantizes keys R tokens at a time in groups of g',
    path: ['residualLength'],
  });
export type KiviOptions = z.output<typeof KiviOptionsSchema>;

/** One quantized block: unpacked codes (one byte each), and float16 bits of the scale and minimum of each group. */
export interface KiviBlock {
  codes: Uint8Array;
  scale: Uint16Array;
  min: Uint16Array;
}

/**
 * Asymmetric min–max quantization as KIVI's `triton_quantize_and_pack_along_last_dim`
 * (jy-yuan/KIVI, quant/new_pack.py): per group, mn = min, scale = (max − mn)/(2^b − 1),
 * q = round(clamp((x − mn)/scale, 0, 2^b − 1)) (half-to-even, as torch.round), x̂ = q·scale + mn.
 * mn and scale are rounded to float16 first (KIVI keeps them in the model's 16-bit dtype), and the
 * codes are computed with the rounded values. A group of equal values (scale 0) gets codes 0.
 */
function minMaxQuantize(x: ArrayLike<number>, nGroups: number, groupOf: (i: number) => number, bits: number): KiviBlock {
  const maxq = 2 ** bits - 1;
  const lo = new Float64Array(nGroups).fill(Infinity);
  const hi = new Float64Array(nGroups).fill(-Infinity);
  for (let i = 0; i < x.length; i++) {
    const gi = groupOf(i);
    const v = x[i];
    if (v < lo[gi]) lo[gi] = v;
    if (v > hi[gi]) hi[gi] = v;
  }
  const scale = new Uint16Array(nGroups);
  const min = new Uint16Array(nGroups);
  const s = new Float64Array(nGroups);
  const m = new Float64Array(nGroups);
  for (let gi = 0; gi < nGroups; gi++) {
    min[gi] = toHalfBits(lo[gi]);
    scale[gi] = toHalfBits((hi[gi] - lo[gi]) / maxq);
    m[gi] = fromHalfBits(min[gi]);
    s[gi] = fromHalfBits(scale[gi]);
    if (!Number.isFinite(m[gi]) || !Number.isFinite(s[gi]))
      throw new KvpackError('nonfinite', `kivi: a quantization group spans [${lo[gi]}, ${hi[gi]}], beyond the float16 range (±65504) of its scale and minimum`);
  }
  const codes = new Uint8Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const gi = groupOf(i);
    codes[i] = s[gi] > 0 ? Math.min(maxq, Math.max(0, roundHalfEven((x[i] - m[gi]) / s[gi]))) : 0;
  }
  return { codes, scale, min };
}

function minMaxDequantize(codes: Uint8Array, scale: Uint16Array, min: Uint16Array, groupOf: (i: number) => number): Float32Array {
  const s = decodeHalf(scale);
  const m = decodeHalf(min);
  const out = new Float32Array(codes.length);
  for (let i = 0; i < codes.length; i++) {
    const gi = groupOf(i);
    out[i] = codes[i] * s[gi] + m[gi];
  }
  return out;
}

/** Group of element (t, h, c) of a [n, H, d] key block: channel c of head h over tokens ⌊t/g⌋·g … +g−1. */
function keyGroup(H: number, d: number, g: number): (i: number) => number {
  const Hd = H * d;
  return (i) => Math.floor(Math.floor(i / Hd) / g) * Hd + (i % Hd);
}

/** Group of element (t, h, c) of a [n, H, d] value block: token t, head h, channels ⌊c/g⌋·g … +g−1. */
function valueGroup(d: number, g: number): (i: number) => number {
  const gpr = d / g;
  return (i) => Math.floor(i / d) * gpr + Math.floor((i % d) / g);
}

/**
 * KIVI key quantization: per channel, over groups of g consecutive tokens. x is [n, H, d] with
 * n % g == 0; scale and min are [n/g, H, d]. Codes are returned unpacked, [n, H, d].
 */
export function quantizeKeysPerChannel(x: ArrayLike<number>, n: number, H: number, d: number, g: number, bits: number): KiviBlock {
  check(n % g === 0 && x.length === n * H * d, 'shape', `kivi: key block of ${n} tokens is not [n, ${H}, ${d}] with n a multiple of g = ${g}`);
  return minMaxQuantize(x, (n / g) * H * d, keyGroup(H, d, g), bits);
}

/** Inverse of {@link quantizeKeysPerChannel}: [n, H, d] float32. */
export function dequantizeKeysPerChannel(b: KiviBlock, H: number, d: number, g: number): Float32Array {
  return minMaxDequantize(b.codes, b.scale, b.min, keyGroup(H, d, g));
}

/**
 * KIVI value quantization: per token, over groups of g consecutive channels of one KV head. x is
 * [n, H, d] with d % g == 0; scale and min are [n, H, d/g]. Codes are returned unpacked.
 */
export function quantizeValuesPerToken(x: ArrayLike<number>, n: number, H: number, d: number, g: number, bits: number): KiviBlock {
  check(d % g === 0 && x.length === n * H * d, 'shape', `kivi: value block is not [${n}, ${H}, ${d}] with d a multiple of g = ${g}`);
  return minMaxQuantize(x, n * H * (d / g), valueGroup(d, g), bits);
}

/** Inverse of {@link quantizeValuesPerToken}: [n, H, d] float32. */
export function dequantizeValuesPerToken(b: KiviBlock, d: number, g: number): Float32Array {
  return minMaxDequantize(b.codes, b.scale, b.min, valueGroup(d, g));
}

/** What one layer of a KIVI cache holds: quantized keys/values, and the 16-bit full-precision windows. */
interface KiviLayer {
  /** Quantized key tokens (a multiple of R): packed codes [nk, H, d], scale/min [nk/g, H, d]. */
  kCodes: PackedCodes;
  kScale: HalfArray;
  kMin: HalfArray;
  /** Their dequantized post-RoPE keys on the backend, [nk, H, d], or null. */
  kDeq: tf.Tensor3D | null;
  /** Full-precision post-RoPE key window (float16-rounded), [r_k, H, d], or null. */
  kWin: tf.Tensor3D | null;
  /** Quantized value tokens: packed codes [nv, H, d], scale/min [nv, H, d/g]. */
  vCodes: PackedCodes;
  vScale: HalfArray;
  vMin: HalfArray;
  vDeq: tf.Tensor3D | null;
  /** Full-precision value window (float16-rounded), [r_v, H, d], or null. */
  vWin: tf.Tensor3D | null;
}

function rows(x: tf.Tensor3D | null): number {
  return x ? x.shape[0] : 0;
}

function concatOrKeep(a: tf.Tensor3D | null, b: tf.Tensor3D): tf.Tensor3D {
  if (!a) return b;
  const out = tf.concat([a, b], 0);
  a.dispose();
  b.dispose();
  return out;
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
  const { bits: b, quantGroupSize: g, residualLength: R } = options;
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
    return this.state[layer].kCodes.count / (this.layout.nKvHeads * this.layout.headDim);
  }
  /** Quantized value tokens of a layer (n_v). */
  quantizedValueTokens(layer: number): number {
    this.assertLive(layer);
    return this.state[layer].vCodes.count / (this.layout.nKvHeads * this.layout.headDim);
  }

  protected prefillTokens(layer: number): number {
    const s = this.state[layer];
    return this.quantizedKeyTokens(layer) + rows(s.kWin);
  }

  private joined(a: tf.Tensor3D | null, b: tf.Tensor3D | null): tf.Tensor3D {
    if (a && b) return tf.concat([a, b], 0);
    return tf.clone((a ?? b)!);
  }
  protected prefillKeys(layer: number): tf.Tensor3D {
    return this.joined(this.state[layer].kDeq, this.state[layer].kWin);
  }
  protected prefillValues(layer: number): tf.Tensor3D {
    return this.joined(this.state[layer].vDeq, this.state[layer].vWin);
  }

  /** Quantizes the first n tokens of the key window as one block. */
  private flushKeys(s: KiviLayer, n: number): void {
    const { nKvHeads: H, headDim: d } = this.layout;
    const { bits, quantGroupSize: g } = this.options;
    const win = s.kWin!;
    const data = readSyncOrExplain(win, 'the KIVI key window', 'KIVI quantizes decode tokens on the host: run it on wasm, cpu or tensorflow').subarray(0, n * H * d);
    const block = quantizeKeysPerChannel(data, n, H, d, g, bits);
    s.kCodes.push(block.codes);
    s.kScale.push(block.scale);
    s.kMin.push(block.min);
    s.kDeq = concatOrKeep(s.kDeq, tf.tensor3d(dequantizeKeysPerChannel(block, H, d, g), [n, H, d]));
    s.kWin = n === win.shape[0] ? null : tf.slice(win, [n, 0, 0], [win.shape[0] - n, H, d]);
    win.dispose();
  }

  /** Quantizes the oldest n tokens of the value window, token by token. */
  private flushValues(s: KiviLayer, n: number): void {
    const { nKvHeads: H, headDim: d } = this.layout;
    const { bits, quantGroupSize: g } = this.options;
    const win = s.vWin!;
    const data = readSyncOrExplain(win, 'the KIVI value window', 'KIVI quantizes decode tokens on the host: run it on wasm, cpu or tensorflow').subarray(0, n * H * d);
    const block = quantizeValuesPerToken(data, n, H, d, g, bits);
    s.vCodes.push(block.codes);
    s.vScale.push(block.scale);
    s.vMin.push(block.min);
    s.vDeq = concatOrKeep(s.vDeq, tf.tensor3d(dequantizeValuesPerToken(block, d, g), [n, H, d]));
    s.vWin = n === win.shape[0] ? null : tf.slice(win, [n, 0, 0], [win.shape[0] - n, H, d]);
    win.dispose();
  }

  /**
   * Appends decode tokens (post-RoPE keys and values, [n, H_kv, d]) to KIVI's float16 windows, first
   * quantizing what the previous appends left beyond them (see the class comment). Decode tokens are
   * therefore rounded to float16 and later quantized; they are not kept exact.
   * @throws KvpackError('shape' | 'dtype' | 'disposed')
   */
  override append(layer: number, keys: tf.Tensor3D, values: tf.Tensor3D): void {
    this.assertLive(layer);
    checkKV(keys, this.layout, `append(layer ${layer}) keys`);
    checkKV(values, this.layout, `append(layer ${layer}) values`, keys.shape[0]);
    const s = this.state[layer];
    const R = this.options.residualLength;
    const rk = rows(s.kWin);
    if (rk >= R) this.flushKeys(s, Math.floor(rk / R) * R);
    const rv = rows(s.vWin);
    if (rv > R) this.flushValues(s, rv - R);
    const half = (x: tf.Tensor3D) => tf.tensor3d(roundHalf(readSyncOrExplain(x, 'appended KIVI tokens', 'KIVI quantizes decode tokens on the host: run it on wasm, cpu or tensorflow')), x.shape);
    s.kWin = concatOrKeep(s.kWin, half(keys));
    s.vWin = concatOrKeep(s.vWin, half(values));
  }

  protected stored(): StoredItem[] {
    const { nKvHeads: H, headDim: d } = this.layout;
    const { bits, quantGroupSize: g } = this.options;
    const win = (name: string, x: tf.Tensor3D | null): StoredItem =>
      x ? { name, tensor: x, dtype: 'float16' } : { name, dtype: 'float16', shape: [0, H, d], data: new Uint16Array(0) };
    return this.state.flatMap((s, l): StoredItem[] => {
      const nk = s.kCodes.count / (H * d);
      const nv = s.vCodes.count / (H * d);
      return [
        { name: `k.${l}.codes`, dtype: 'uint8', shape: [Math.ceil((s.kCodes.count * bits) / 8)], data: s.kCodes.bytes() },
        { name: `k.${l}.scale`, dtype: 'float16', shape: [nk / g, H, d], data: s.kScale.values() },
        { name: `k.${l}.min`, dtype: 'float16', shape: [nk / g, H, d], data: s.kMin.values() },
        win(`k.${l}.window`, s.kWin),
        { name: `v.${l}.codes`, dtype: 'uint8', shape: [Math.ceil((s.vCodes.count * bits) / 8)], data: s.vCodes.bytes() },
        { name: `v.${l}.scale`, dtype: 'float16', shape: [nv, H, d / g], data: s.vScale.values() },
        { name: `v.${l}.min`, dtype: 'float16', shape: [nv, H, d / g], data: s.vMin.values() },
        win(`v.${l}.window`, s.vWin),
      ];
    });
  }

  protected disposeStored(): void {
    for (const s of this.state) tf.dispose([s.kDeq, s.kWin, s.vDeq, s.vWin].filter((x): x is tf.Tensor3D => x !== null));
  }
}

/**
 * The `kivi` strategy. At prefill (T tokens), per layer: the first T − (T mod R) post-RoPE keys are
 * quantized per channel in groups of g tokens and the last T mod R stay in the float16 key window;
 * all but the last R values are quantized per token in groups of g channels and the last min(T, R)
 * stay in the float16 value window (jy-yuan/KIVI, models/llama_kivi.py, prefill branch).
 * `compress` throws KvpackError('shape') when head_dim is not a multiple of g, and
 * KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache (a group beyond the float16
 * range of its scale included); a failed compress frees what it built.
 */
export const kiviDefinition = defineStrategy({
  name: 'kivi',
  description: 'KIVI: 2/4-bit asymmetric quantization, keys per channel and values per token, with a 16-bit residual window (Liu et al. 2024)',
  schema: KiviOptionsSchema,
  renamedOptions: { groupSize: 'quantGroupSize' },
  compress: (cache, options, T) =>
    disposeOwnedOnError(async (own) => {
      const { nKvHeads: H, headDim: d } = cache.layout;
      const { bits, quantGroupSize: g, residualLength: R } = options;
      check(d % g === 0, 'shape', `kivi: head_dim ${d} is not a multiple of quantGroupSize ${g} (values are quantized in groups of g channels)`);
      const state: KiviLayer[] = [];
      for (let l = 0; l < cache.layout.nLayers; l++) {
        const post = applyRope(cache.keys[l], cache.rope, { start: cache.startPosition ?? 0, count: T });
        let kData: Float32Array;
        try {
          kData = (await post.data()) as Float32Array;
        } finally {
          post.dispose();
        }
        const vData = (await cache.values[l].data()) as Float32Array;
        const s: KiviLayer = {
          kCodes: new PackedCodes(bits),
          kScale: new HalfArray(),
          kMin: new HalfArray(),
          kDeq: null,
          kWin: null,
          vCodes: new PackedCodes(bits),
          vScale: new HalfArray(),
          vMin: new HalfArray(),
          vDeq: null,
          vWin: null,
        };
        state.push(s);
        const nk = T - (T % R);
        if (nk > 0) {
          const b = quantizeKeysPerChannel(kData.subarray(0, nk * H * d), nk, H, d, g, bits);
          s.kCodes.push(b.codes);
          s.kScale.push(b.scale);
          s.kMin.push(b.min);
          s.kDeq = own(tf.tensor3d(dequantizeKeysPerChannel(b, H, d, g), [nk, H, d]));
        }
        if (nk < T) s.kWin = own(tf.tensor3d(roundHalf(kData.subarray(nk * H * d)), [T - nk, H, d]));
        const nv = Math.max(0, T - R);
        if (nv > 0) {
          const b = quantizeValuesPerToken(vData.subarray(0, nv * H * d), nv, H, d, g, bits);
          s.vCodes.push(b.codes);
          s.vScale.push(b.scale);
          s.vMin.push(b.min);
          s.vDeq = own(tf.tensor3d(dequantizeValuesPerToken(b, d, g), [nv, H, d]));
        }
        s.vWin = own(tf.tensor3d(roundHalf(vData.subarray(nv * H * d)), [T - nv, H, d]));
      }
      return new KiviCache(cache.layout, cache.rope, T, options, state);
    }),
  restore(r, options) {
    const { layout, rope, prefillLength } = r.header;
    const { nKvHeads: H, headDim: d } = layout;
    const { bits, quantGroupSize: g } = options;
    check(d % g === 0, 'corrupt', `serialized kivi cache is corrupt: head_dim ${d} is not a multiple of its group size ${g}`);
    const state: KiviLayer[] = [];
    for (let l = 0; l < layout.nLayers; l++) {
      // Keys: per-channel groups of g tokens, [nk/g, H, d] scales; values: per-token groups of g channels, [nv, H, d/g].
      const nk = r.shape(`k.${l}.scale`, { dtype: 'float16', shape: [null, H, d] })[0] * g;
      const nv = r.shape(`v.${l}.scale`, { dtype: 'float16', shape: [null, H, d / g] })[0];
      const half = (name: string, shape: number[]) => r.host<Uint16Array>(name, { dtype: 'float16', shape });
      const codes = (name: string, count: number) => new PackedCodes(bits, { bytes: r.host<Uint8Array>(name, { dtype: 'uint8', shape: [Math.ceil((count * bits) / 8)] }), count });
      const kBlock: KiviBlock = { codes: new Uint8Array(0), scale: half(`k.${l}.scale`, [nk / g, H, d]), min: half(`k.${l}.min`, [nk / g, H, d]) };
      const vBlock: KiviBlock = { codes: new Uint8Array(0), scale: half(`v.${l}.scale`, [nv, H, d / g]), min: half(`v.${l}.min`, [nv, H, d / g]) };
      const kCodes = codes(`k.${l}.codes`, nk * H * d);
      const vCodes = codes(`v.${l}.codes`, nv * H * d);
      kBlock.codes = kCodes.unpack();
      vBlock.codes = vCodes.unpack();
      const window = (name: string) => {
        const rowsHeld = r.shape(name, { dtype: 'float16', shape: [null, H, d] })[0];
        return rowsHeld > 0 ? r.tensor<tf.Tensor3D>(name, { shape: [rowsHeld, H, d] }) : null;
      };
      state.push({
        kCodes,
        kScale: new HalfArray(kBlock.scale),
        kMin: new HalfArray(kBlock.min),
        kDeq: nk > 0 ? tf.tensor3d(dequantizeKeysPerChannel(kBlock, H, d, g), [nk, H, d]) : null,
        kWin: window(`k.${l}.window`),
        vCodes,
        vScale: new HalfArray(vBlock.scale),
        vMin: new HalfArray(vBlock.min),
        vDeq: nv > 0 ? tf.tensor3d(dequantizeValuesPerToken(vBlock, d, g), [nv, H, d]) : null,
        vWin: window(`v.${l}.window`),
      });
    }
    return new KiviCache(layout, rope, prefillLength, options, state);
  },
});
