import { check, fromHalfBits, toHalfBits, type StoredReader } from '@kvpack/core';
import { packCodes, unpackCodes } from './packing.js';

/**
 * Group-wise integer quantization of stored low-rank factors (xKV composed with
 * quantization). Follows the quantizer of the xKV authors' follow-up (abdelfattah-lab/xKV,
 * `xKV/customized_cache/quant.py`, run with `--kv_bits 4 --group_size 32`): each row of a matrix
 * is cut into groups of `quantGroupSize` consecutive elements along its last axis; a group gets one
 * scale (and, when asymmetric, one integer zero point); values are rounded half-to-even as
 * `torch.round` does.
 *
 * - symmetric: scale = max|x| / (2^(b−1) − 1), q = clamp(round(x / scale), −2^(b−1), 2^(b−1) − 1),
 *   x̂ = q · scale.
 * - asymmetric: scale = (max − min) / (2^b − 1), zero = clamp(round(−min / scale), 0, 2^b − 1),
 *   q = clamp(round(x / scale) + zero, 0, 2^b − 1), x̂ = (q − zero) · scale.
 *
 * The scale is rounded to float16 *before* the codes are computed, so the stored 16-bit scale is
 * the one the codes were made with. A scale that is 0 or underflows float16 becomes the smallest
 * float16 subnormal (2^−24); one that overflows becomes 65504.
 */
export interface QuantSpec {
  /** Bits per code: 8 or 4. */
  bits: 4 | 8;
  /** Elements per quantization group along a row's last axis (the last group of a row may be shorter). */
  quantGroupSize: number;
  /** Symmetric (scale only) or asymmetric (scale + uint8 zero point per group). */
  symmetric: boolean;
}

/** A quantized row-major [rows, cols] float matrix. */
export interface QuantizedMatrix extends QuantSpec {
  rows: number;
  cols: number;
  /** Bit-packed unsigned codes, row-major; 4-bit codes two per byte, the even element in the low nibble. */
  codes: Uint8Array;
  /** float16 bits of each group's scale, [rows · groupsPerRow]. */
  scales: Uint16Array;
  /** Integer zero point per group (asymmetric only), [rows · groupsPerRow]; null when symmetric. */
  zeros: Uint8Array | null;
}

/** Round half to even (what `torch.round` does). */
export function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d < 0.5) return f;
  if (d > 0.5) return f + 1;
  return f % 2 === 0 ? f : f + 1;
}

/** Quantization groups per row of `cols` elements. */
export function groupsPerRow(cols: number, quantGroupSize: number): number {
  return Math.ceil(cols / quantGroupSize);
}

/**
 * Bytes a quantized [rows, cols] matrix holds: packed codes ⌈rows·cols·bits/8⌉ + 2 per scale
 * (+ 1 per zero point when asymmetric).
 */
export function quantizedBytes(rows: number, cols: number, spec: QuantSpec): number {
  const groups = rows * groupsPerRow(cols, spec.quantGroupSize);
  return Math.ceil((rows * cols * spec.bits) / 8) + groups * 2 + (spec.symmetric ? 0 : groups);
}

function halfScale(s: number): number {
  let h = toHalfBits(s);
  if ((h & 0x7fff) === 0) h = 1; // zero or underflow → smallest subnormal
  if ((h & 0x7c00) === 0x7c00) h = 0x7bff; // overflow → 65504
  return h;
}

/**
 * Quantizes a row-major [rows, cols] matrix group-wise.
 * @throws KvpackError('shape' | 'config' | 'nonfinite') on a size mismatch, a bad spec or NaN/Inf input.
 */
export function quantizeMatrix(data: ArrayLike<number>, rows: number, cols: number, spec: QuantSpec): QuantizedMatrix {
  check(data.length === rows * cols, 'shape', `quantizeMatrix: ${data.length} values for [${rows}, ${cols}]`);
  check(spec.bits === 4 || spec.bits === 8, 'config', `factor quantization: bits must be 4 or 8, got ${spec.bits}`);
  check(Number.isInteger(spec.quantGroupSize) && spec.quantGroupSize >= 1, 'config', `factor quantization: quantGroupSize must be a positive integer, got ${spec.quantGroupSize}`);
  const { bits, quantGroupSize, symmetric } = spec;
  const gpr = groupsPerRow(cols, quantGroupSize);
  const scales = new Uint16Array(rows * gpr);
  const zeros = symmetric ? null : new Uint8Array(rows * gpr);
  const codes = new Uint8Array(rows * cols);
  const qLo = symmetric ? -(2 ** (bits - 1)) : 0;
  const qHi = symmetric ? 2 ** (bits - 1) - 1 : 2 ** bits - 1;
  for (let r = 0; r < rows; r++) {
    for (let g = 0; g < gpr; g++) {
      const a = r * cols + g * quantGroupSize;
      const b = r * cols + Math.min(cols, (g + 1) * quantGroupSize);
      let lo = Infinity;
      let hi = -Infinity;
      for (let i = a; i < b; i++) {
        const x = data[i];
        check(Number.isFinite(x), 'nonfinite', `quantizeMatrix: element ${i} is ${x}`);
        if (x < lo) lo = x;
        if (x > hi) hi = x;
      }
      const gi = r * gpr + g;
      let zero = 0;
      let scale: number;
      if (symmetric) {
        scales[gi] = halfScale(Math.max(Math.abs(lo), Math.abs(hi)) / qHi);
        scale = fromHalfBits(scales[gi]);
      } else {
        scales[gi] = halfScale((hi - lo) / qHi);
        scale = fromHalfBits(scales[gi]);
        zero = Math.min(qHi, Math.max(0, roundHalfEven(-lo / scale)));
        zeros![gi] = zero;
      }
      for (let i = a; i < b; i++) {
        const q = Math.min(qHi, Math.max(qLo, roundHalfEven(data[i] / scale) + zero));
        codes[i] = q - qLo; // unsigned code in [0, 2^bits)
      }
    }
  }
  return { rows, cols, bits, quantGroupSize, symmetric, codes: packCodes(codes, bits), scales, zeros };
}

/**
 * The first `rows` rows of a quantized matrix, exactly as stored: groups lie within rows, so the
 * codes of rows [0, rows) (repacked when a row does not end on a byte), their scales and zero points.
 * @throws KvpackError('shape') when rows is not an integer in [0, q.rows].
 */
export function quantizedRowPrefix(q: QuantizedMatrix, rows: number): QuantizedMatrix {
  check(Number.isInteger(rows) && rows >= 0 && rows <= q.rows, 'shape', `quantized row prefix: ${rows} rows is out of range [0, ${q.rows}]`);
  const n = rows * q.cols;
  const groups = rows * groupsPerRow(q.cols, q.quantGroupSize);
  const codes = (n * q.bits) % 8 === 0 ? q.codes.slice(0, (n * q.bits) / 8) : packCodes(unpackCodes(q.codes, q.bits, q.rows * q.cols).subarray(0, n), q.bits);
  return { ...q, rows, codes, scales: q.scales.slice(0, groups), zeros: q.zeros ? q.zeros.slice(0, groups) : null };
}

/** Restores the float values of a quantized matrix, row-major [rows, cols] float32. */
export function dequantizeMatrix(q: QuantizedMatrix): Float32Array {
  const { rows, cols, bits, quantGroupSize, symmetric, codes, scales, zeros } = q;
  const gpr = groupsPerRow(cols, quantGroupSize);
  const qLo = symmetric ? -(2 ** (bits - 1)) : 0;
  const out = new Float32Array(rows * cols);
  const unpacked = unpackCodes(codes, bits, rows * cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const i = r * cols + c;
      const gi = r * gpr + Math.floor(c / quantGroupSize);
      const u = unpacked[i];
      const zero = zeros ? zeros[gi] : 0;
      out[i] = (u + qLo - zero) * fromHalfBits(scales[gi]);
    }
  }
  return out;
}

/**
 * Restores the quantized [rows, cols] matrix stored under `name` (`name.codes`, `name.scales`, `name.zeros`: see `heldQuantizedItems`).
 * @throws KvpackError('corrupt') naming the tensor when a part is missing or has the wrong dtype or
 *         length for [rows, cols] at spec.bits.
 */
export function readQuantized(r: Omit<StoredReader, 'header'>, name: string, rows: number, cols: number, spec: QuantSpec): QuantizedMatrix {
  const groups = rows * groupsPerRow(cols, spec.quantGroupSize);
  return {
    ...spec,
    rows,
    cols,
    codes: r.host<Uint8Array>(`${name}.codes`, { dtype: 'uint8', shape: [Math.ceil((rows * cols * spec.bits) / 8)] }),
    scales: r.host<Uint16Array>(`${name}.scales`, { dtype: 'float16', shape: [groups] }),
    zeros: spec.symmetric ? null : r.host<Uint8Array>(`${name}.zeros`, { dtype: 'uint8', shape: [groups] }),
  };
}
