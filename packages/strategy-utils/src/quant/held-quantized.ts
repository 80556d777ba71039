import type * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, type StoredItem, type StoredSpec } from '@kvpack/core';
import { CodesTensor, codesItem, dequantizeOnBackend } from './codes-tensor.js';
import { groupsPerRow, type QuantSpec, type QuantizedMatrix } from './quantize.js';

/**
 * A group-quantized [rows, cols] matrix ({@link quantizeMatrix}) held on the backend in its stored
 * form only: packed codes, float16 scale per group and, asymmetric, packed 8-bit zero points. What a
 * serialization writes is read back from these tensors; no host copy is kept.
 */
export interface HeldQuantized extends QuantSpec {
  rows: number;
  cols: number;
  /** Packed codes, ⌈rows·cols·bits/8⌉ bytes. */
  codes: CodesTensor;
  /** float16 scale per group, [rows · groupsPerRow]. */
  scales: HalfTensor;
  /** 8-bit zero point per group, [rows · groupsPerRow] (asymmetric), or null. */
  zeros: CodesTensor | null;
}

/** Uploads a host-quantized matrix in its stored form (no decode). */
export function holdQuantized(q: QuantizedMatrix): HeldQuantized {
  const groups = q.rows * groupsPerRow(q.cols, q.quantGroupSize);
  const codes = CodesTensor.fromBytes(q.codes, q.bits, q.rows * q.cols);
  try {
    const scales = HalfTensor.fromBits(q.scales, [groups]);
    const { rows, cols, bits, quantGroupSize, symmetric } = q;
    return { rows, cols, bits, quantGroupSize, symmetric, codes, scales, zeros: q.zeros ? CodesTensor.fromBytes(q.zeros, 8, groups) : null };
  } catch (e) {
    codes.dispose();
    throw e;
  }
}

/** The held matrix read back to the host in its stored form (codes, float16 scale bits, zero points): one asynchronous readback per tensor. */
export async function readHeldQuantized(h: HeldQuantized): Promise<QuantizedMatrix> {
  const bytes = async (c: CodesTensor) => new Uint8Array(Int32Array.from((await c.packed.data()) as Int32Array).buffer, 0, c.byteLength);
  const { rows, cols, bits, quantGroupSize, symmetric } = h;
  return { rows, cols, bits, quantGroupSize, symmetric, codes: await bytes(h.codes), scales: await h.scales.bits(), zeros: h.zeros ? await bytes(h.zeros) : null };
}

/** The matrix dequantized, a transient float32 [rows, cols] ({@link dequantizeOnBackend}, bit-identical to `dequantizeMatrix`). */
export function dequantizeHeld(h: HeldQuantized): tf.Tensor2D {
  return dequantizeOnBackend(h, h.codes, h.scales, h.zeros);
}

/**
 * The stored items `name.codes` (uint8), `name.scales` (float16) and, asymmetric, `name.zeros`
 * (uint8), ⌈rows·cols·bits/8⌉ + 2·groups (+ groups) bytes ({@link quantizedBytes}), read back only when
 * written; {@link readQuantized} reads them.
 */
export function heldQuantizedItems(name: string, h: HeldQuantized): StoredItem[] {
  return [codesItem(`${name}.codes`, h.codes), { name: `${name}.scales`, half: h.scales }, ...(h.zeros ? [codesItem(`${name}.zeros`, h.zeros)] : [])];
}

/** Name, dtype and shape of {@link heldQuantizedItems} (no data). */
export function heldQuantizedSpecs(name: string, h: HeldQuantized): StoredSpec[] {
  return [
    { name: `${name}.codes`, dtype: 'uint8', shape: [h.codes.byteLength] },
    { name: `${name}.scales`, dtype: 'float16', shape: [...h.scales.shape] },
    ...(h.zeros ? [{ name: `${name}.zeros`, dtype: 'uint8' as const, shape: [h.zeros.byteLength] }] : []),
  ];
}

/** Bytes held on the backend. */
export function heldQuantizedResidentBytes(h: HeldQuantized): number {
  return h.codes.residentBytes + h.scales.residentBytes + (h.zeros?.residentBytes ?? 0);
}

/** Frees the held tensors. Idempotent. */
export function disposeHeldQuantized(h: HeldQuantized): void {
  h.codes.dispose();
  h.scales.dispose();
  h.zeros?.dispose();
}
