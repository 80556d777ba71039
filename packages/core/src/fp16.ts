/**
 * IEEE-754 half precision (float16) and bfloat16 conversion on the host.
 * Used for 16-bit storage: values are rounded through 16 bits at compress time so that the tensors a
 * strategy keeps on the backend equal what its serialization restores.
 */

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float32 → float16 bits, round-to-nearest-even, with overflow to ±Inf and subnormals. */
export function toHalfBits(value: number): number {
  f32[0] = value;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // Inf / NaN
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = mant & ((1 << shift) - 1);
    let m = mant >>> shift;
    if (rest > half || (rest === half && m & 1)) m += 1;
    return sign | m;
  }
  const rest = mant & 0x1fff;
  let h = sign | (e << 10) | (mant >>> 13);
  if (rest > 0x1000 || (rest === 0x1000 && h & 1)) h += 1;
  return h;
}

/** float16 bits → number. */
export function fromHalfBits(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 0x1f) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

const HALF_TABLE = (() => {
  const t = new Float32Array(65536);
  for (let i = 0; i < 65536; i++) t[i] = fromHalfBits(i);
  return t;
})();

/** Encodes float32 values as float16 bits. */
export function encodeHalf(src: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = toHalfBits(src[i]);
  return out;
}

/** Decodes float16 bits to float32. */
export function decodeHalf(src: Uint16Array): Float32Array {
  const out = new Float32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = HALF_TABLE[src[i]];
  return out;
}

/** Rounds float32 values through float16 (what 16-bit storage keeps). */
export function roundHalf(src: ArrayLike<number>): Float32Array {
  const out = new Float32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = HALF_TABLE[toHalfBits(src[i])];
  return out;
}

/** Decodes bfloat16 bits (upper half of a float32) to float32. */
export function decodeBFloat16(src: Uint16Array): Float32Array {
  const out = new Float32Array(src.length);
  const o32 = new Uint32Array(out.buffer);
  for (let i = 0; i < src.length; i++) o32[i] = src[i] << 16;
  return out;
}

/** Encodes float32 as bfloat16 bits, round-to-nearest-even. */
export function encodeBFloat16(src: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) {
    f32[0] = src[i];
    const x = u32[0];
    if ((x & 0x7f800000) === 0x7f800000 && x & 0x7fffff) {
      out[i] = (x >>> 16) | 0x40;
      continue;
    }
    out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return out;
}
