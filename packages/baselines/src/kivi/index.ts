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
  decodeHalf,
  encodeHalf,
  fromHalfBits,
  defineStrategy,
  readSyncOrExplain,
  toHalfBits,
  type ModelLayout,
  type RopeConfig,
  type StoredItem,
} from '@kvpack/core';
import { roundHalfEven, type MinMaxGrouping } from '@kvpack/strategy-utils';
import { z } from 'zod';
import { HeldMinMaxBlocks, concat16, type KiviBlock } from './held.js';

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

export type { KiviBlock };

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

function disposeLayer(s: KiviLayer): void {
  s.k.dispose();
  s.v.dispose();
  s.kWin?.dispose();
  s.vWin?.dispose();
}

/** An empty layer: keys grouped over g tokens per channel (merged block by block), values over g channels per token (a tail of up to R tokens). */
function emptyLayer(options: KiviOptions, H: number, d: number): KiviLayer {
  const { bits, quantGroupSize: g, residualLength: R } = options;
  return {
    k: new HeldMinMaxBlocks({ along: 'tokens', bits, H, d, g, tailTokens: R }),
    kWin: null,
    v: new HeldMinMaxBlocks({ along: 'channels', bits, H, d, g, tailTokens: R }),
    vWin: null,
  };
}

const HOST_ONLY = 'KIVI quantizes decode tokens on the host: run it on wasm, cpu or tensorflow';

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
   * therefore rounded to float16 and later quantized; they are not kept exact. Runs on the host
   * (synchronous readbacks of the new tokens and the windows); what it stores is held packed on the
   * backend afterwards. Nothing changes if it throws.
   * @throws KvpackError('shape' | 'dtype' | 'disposed' | 'nonfinite' | 'unsupported')
   */
  override append(layer: number, keys: tf.Tensor3D, values: tf.Tensor3D): void {
    this.assertLive(layer);
    checkKV(keys, this.layout, `append(layer ${layer}) keys`);
    checkKV(values, this.layout, `append(layer ${layer}) values`, keys.shape[0]);
    const s = this.state[layer];
    const { nKvHeads: H, headDim: d } = this.layout;
    const { bits, quantGroupSize: g, residualLength: R } = this.options;
    const hd = H * d;
    const n = keys.shape[0];
    const kNew = encodeHalf(readSyncOrExplain(keys, 'appended KIVI tokens', HOST_ONLY));
    const vNew = encodeHalf(readSyncOrExplain(values, 'appended KIVI tokens', HOST_ONLY));
    const kWin = s.kWin ? s.kWin.bitsSync('the KIVI key window') : new Uint16Array(0);
    const vWin = s.vWin ? s.vWin.bitsSync('the KIVI value window') : new Uint16Array(0);
    // Keys: a window of R or more tokens is quantized R at a time; values: beyond R, the oldest tokens.
    const rk = kWin.length / hd;
    const nk = rk >= R ? Math.floor(rk / R) * R : 0;
    const kBlock = nk > 0 ? quantizeKeysPerChannel(decodeHalf(kWin.subarray(0, nk * hd)), nk, H, d, g, bits) : null;
    const rv = vWin.length / hd;
    const nv = rv > R ? rv - R : 0;
    const vBlock = nv > 0 ? quantizeValuesPerToken(decodeHalf(vWin.subarray(0, nv * hd)), nv, H, d, g, bits) : null;
    const kNext = HalfTensor.fromBits(concat16(kWin.subarray(nk * hd), kNew), [rk - nk + n, H, d]);
    const vNext = HalfTensor.fromBits(concat16(vWin.subarray(nv * hd), vNew), [rv - nv + n, H, d]);
    try {
      if (kBlock) s.k.push(kBlock, nk);
      if (vBlock) s.v.push(vBlock, nv);
    } catch (e) {
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
 * range of its scale included); a failed compress frees what it built.
 */
export const kiviDefinition = defineStrategy({
  name: 'kivi',
  description: 'KIVI: 2/4-bit asymmetric quantization, keys per channel and values per token, with a 16-bit residual window (Liu et al. 2024)',
  schema: KiviOptionsSchema,
  renamedOptions: { groupSize: 'quantGroupSize' },
  capabilities: {
    cutPrefix: (o) =>
      `kivi quantizes keys per channel over groups of ${o.quantGroupSize} tokens with one scale and zero point per group, and keeps the last tokens in a float16 window: a prefix ending inside a key group would need that group's codes re-quantized, which changes the stored numbers; store and restore whole prefixes`,
  },
  async compress(cache, options, T) {
    const { nKvHeads: H, headDim: d } = cache.layout;
    const { bits, quantGroupSize: g, residualLength: R } = options;
    check(d % g === 0, 'shape', `kivi: head_dim ${d} is not a multiple of quantGroupSize ${g} (values are quantized in groups of g channels)`);
    const state: KiviLayer[] = [];
    try {
      for (let l = 0; l < cache.layout.nLayers; l++) {
        const post = applyRope(cache.keys[l], cache.rope, { start: cache.startPosition ?? 0, count: T });
        let kData: Float32Array;
        try {
          kData = (await post.data()) as Float32Array;
        } finally {
          post.dispose();
        }
        const vData = (await cache.values[l].data()) as Float32Array;
        const s = emptyLayer(options, H, d);
        state.push(s);
        // Quantized on the host, held packed on the backend: no float32 copy stays there.
        const nk = T - (T % R);
        if (nk > 0) s.k.push(quantizeKeysPerChannel(kData.subarray(0, nk * H * d), nk, H, d, g, bits), nk);
        if (nk < T) s.kWin = HalfTensor.fromBits(encodeHalf(kData.subarray(nk * H * d)), [T - nk, H, d]);
        const nv = Math.max(0, T - R);
        if (nv > 0) s.v.push(quantizeValuesPerToken(vData.subarray(0, nv * H * d), nv, H, d, g, bits), nv);
        s.vWin = HalfTensor.fromBits(encodeHalf(vData.subarray(nv * H * d)), [T - nv, H, d]);
      }
    } catch (e) {
      state.forEach(disposeLayer);
      throw e;
    }
    return new KiviCache(cache.layout, cache.rope, T, options, state);
  },
  restore(r, options) {
    const { layout, rope, prefillLength } = r.header;
    const { nKvHeads: H, headDim: d } = layout;
    const { bits, quantGroupSize: g, residualLength: R } = options;
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
