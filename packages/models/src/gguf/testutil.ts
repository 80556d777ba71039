// Test helpers (not exported from the package): a minimal GGUF v3 writer and ggml quantizers, written
// from the GGUF spec (ggml docs/gguf.md) and ggml-quants.c's quantize_row_q8_0_ref / q4_0_ref.
import { toHalfBits } from '@kvpack/core';

/** GGUF metadata value types (gguf.md `gguf_metadata_value_type`). */
export const GV = { U8: 0, I8: 1, U16: 2, I16: 3, U32: 4, I32: 5, F32: 6, BOOL: 7, STRING: 8, ARRAY: 9, U64: 10, I64: 11, F64: 12 } as const;

export type GgufKV =
  | { key: string; type: 'u32' | 'i32' | 'f32' | 'u64'; value: number }
  | { key: string; type: 'string'; value: string }
  | { key: string; type: 'bool'; value: boolean }
  | { key: string; type: 'strings'; value: string[] }
  | { key: string; type: 'f32s' | 'i32s'; value: number[] };

export interface GgufTensorSpec {
  name: string;
  /** ne, fastest dim first. */
  ne: number[];
  /** ggml type id. */
  type: number;
  data: Uint8Array;
}

class Bytes {
  private parts: Uint8Array[] = [];
  length = 0;
  push(b: Uint8Array): void {
    this.parts.push(b);
    this.length += b.length;
  }
  u32(v: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v, true);
    this.push(b);
  }
  i32(v: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setInt32(0, v, true);
    this.push(b);
  }
  u64(v: number): void {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(v), true);
    this.push(b);
  }
  f32(v: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, v, true);
    this.push(b);
  }
  str(s: string): void {
    const b = new TextEncoder().encode(s);
    this.u64(b.length);
    this.push(b);
  }
  pad(align: number): void {
    const n = (align - (this.length % align)) % align;
    if (n) this.push(new Uint8Array(n));
  }
  concat(): Uint8Array {
    const out = new Uint8Array(this.length);
    let o = 0;
    for (const p of this.parts) {
      out.set(p, o);
      o += p.length;
    }
    return out;
  }
}

/**
 * Encodes a GGUF v3 file: "GGUF", u32 version 3, u64 tensor count, u64 KV count, the KV pairs,
 * the tensor infos (name, n_dims, ne[], type, offset), padding to `alignment`, then each tensor's
 * data at its aligned offset.
 */
export function encodeGguf(kvs: GgufKV[], tensors: GgufTensorSpec[], alignment = 32): Uint8Array {
  const b = new Bytes();
  b.push(new TextEncoder().encode('GGUF'));
  b.u32(3);
  b.u64(tensors.length);
  b.u64(kvs.length + (alignment !== 32 ? 1 : 0));
  const all: GgufKV[] = alignment !== 32 ? [...kvs, { key: 'general.alignment', type: 'u32', value: alignment }] : kvs;
  for (const kv of all) {
    b.str(kv.key);
    switch (kv.type) {
      case 'u32':
        b.u32(GV.U32);
        b.u32(kv.value);
        break;
      case 'i32':
        b.u32(GV.I32);
        b.i32(kv.value);
        break;
      case 'u64':
        b.u32(GV.U64);
        b.u64(kv.value);
        break;
      case 'f32':
        b.u32(GV.F32);
        b.f32(kv.value);
        break;
      case 'bool':
        b.u32(GV.BOOL);
        b.push(new Uint8Array([kv.value ? 1 : 0]));
        break;
      case 'string':
        b.u32(GV.STRING);
        b.str(kv.value);
        break;
      case 'strings':
        b.u32(GV.ARRAY);
        b.u32(GV.STRING);
        b.u64(kv.value.length);
        for (const s of kv.value) b.str(s);
        break;
      case 'f32s':
      case 'i32s':
        b.u32(GV.ARRAY);
        b.u32(kv.type === 'f32s' ? GV.F32 : GV.I32);
        b.u64(kv.value.length);
        for (const v of kv.value) (kv.type === 'f32s' ? b.f32(v) : b.i32(v));
        break;
    }
  }
  let offset = 0;
  const offsets: number[] = [];
  for (const t of tensors) {
    offsets.push(offset);
    offset += Math.ceil(t.data.length / alignment) * alignment;
  }
  tensors.forEach((t, i) => {
    b.str(t.name);
    b.u32(t.ne.length);
    for (const n of t.ne) b.u64(n);
    b.u32(t.type);
    b.u64(offsets[i]);
  });
  b.pad(alignment);
  for (const t of tensors) {
    b.push(t.data);
    b.pad(alignment);
  }
  return b.concat();
}

/** float32 values as little-endian F32 bytes. */
export function f32Bytes(x: Float32Array): Uint8Array {
  return new Uint8Array(Float32Array.from(x).buffer);
}

/** float32 values as F16 bytes (round to nearest even). */
export function f16Bytes(x: Float32Array): Uint8Array {
  const u = new Uint16Array(x.length);
  for (let i = 0; i < x.length; i++) u[i] = toHalfBits(x[i]);
  return new Uint8Array(u.buffer);
}

/** Q8_0 (quantize_row_q8_0_ref): per 32 values d = max|x| / 127, q = round(x / d), d stored as f16. */
export function quantizeQ8_0(x: Float32Array): Uint8Array {
  const out = new Uint8Array((x.length / 32) * 34);
  const dv = new DataView(out.buffer);
  for (let b = 0; b < x.length / 32; b++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[b * 32 + j]));
    const d = amax / 127;
    const id = d ? 1 / d : 0;
    dv.setUint16(b * 34, toHalfBits(d), true);
    for (let j = 0; j < 32; j++) dv.setInt8(b * 34 + 2 + j, Math.round(x[b * 32 + j] * id));
  }
  return out;
}

/**
 * Q4_0 (quantize_row_q4_0_ref): per 32 values, m = the value of largest magnitude, d = m / −8,
 * q = min(15, trunc(x / d + 8.5)); byte j holds q[j] (low nibble) and q[j + 16] (high nibble).
 */
export function quantizeQ4_0(x: Float32Array): Uint8Array {
  const out = new Uint8Array((x.length / 32) * 18);
  const dv = new DataView(out.buffer);
  for (let b = 0; b < x.length / 32; b++) {
    let amax = 0;
    let max = 0;
    for (let j = 0; j < 32; j++) {
      const v = x[b * 32 + j];
      if (Math.abs(v) > amax) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = max / -8;
    const id = d ? 1 / d : 0;
    dv.setUint16(b * 18, toHalfBits(d), true);
    const q = (v: number) => Math.min(15, Math.trunc(v * id + 8.5));
    for (let j = 0; j < 16; j++) out[b * 18 + 2 + j] = q(x[b * 32 + j]) | (q(x[b * 32 + j + 16]) << 4);
  }
  return out;
}
