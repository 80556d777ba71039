import { KvpackError, check, decodeHalf, fromHalfBits, toHalfBits } from '@kvpack/core';
import { roundHalfEven } from '@kvpack/strategy-utils';

// The host float64 KIVI quantizer: the reference the backend quantizer (strategy-utils
// quantizeMinMaxOnBackend) is tested against, bit for bit. Not used at run time.

/** One quantized block on the host: unpacked codes (one byte each), and float16 bits of the scale and minimum of each group. */
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

