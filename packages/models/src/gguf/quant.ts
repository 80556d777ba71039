import { KvpackError, check, decodeBFloat16, decodeHalf, fromHalfBits } from '@kvpack/core';

/**
 * GGML tensor types kvpack dequantizes (values of `enum ggml_type`, ggml.h). Other types (K-quants,
 * IQ-quants, Q4_1, Q5_x, …) are refused with a clear error.
 */
export const GGML_TYPE = { F32: 0, F16: 1, Q4_0: 2, Q8_0: 8, BF16: 30 } as const;

/** Names of every ggml type id (ggml.h), for messages. */
const GGML_TYPE_NAMES: Record<number, string> = {
  0: 'F32', 1: 'F16', 2: 'Q4_0', 3: 'Q4_1', 6: 'Q5_0', 7: 'Q5_1', 8: 'Q8_0', 9: 'Q8_1', 10: 'Q2_K', 11: 'Q3_K',
  12: 'Q4_K', 13: 'Q5_K', 14: 'Q6_K', 15: 'Q8_K', 16: 'IQ2_XXS', 17: 'IQ2_XS', 18: 'IQ3_XXS', 19: 'IQ1_S',
  20: 'IQ4_NL', 21: 'IQ3_S', 22: 'IQ2_S', 23: 'IQ4_XS', 24: 'I8', 25: 'I16', 26: 'I32', 27: 'I64', 28: 'F64',
  29: 'IQ1_M', 30: 'BF16', 34: 'TQ1_0', 35: 'TQ2_0', 39: 'MXFP4',
};

/** The ggml name of a type id ("Q4_K", or "type 99" when unknown). */
export function ggmlTypeName(type: number): string {
  return GGML_TYPE_NAMES[type] ?? `type ${type}`;
}

/** Elements per block and bytes per block of the supported types (ggml-common.h block_q4_0 / block_q8_0). */
const LAYOUT: Record<number, { block: number; bytes: number }> = {
  [GGML_TYPE.F32]: { block: 1, bytes: 4 },
  [GGML_TYPE.F16]: { block: 1, bytes: 2 },
  [GGML_TYPE.BF16]: { block: 1, bytes: 2 },
  [GGML_TYPE.Q8_0]: { block: 32, bytes: 34 }, // f16 scale + 32 × int8
  [GGML_TYPE.Q4_0]: { block: 32, bytes: 18 }, // f16 scale + 16 bytes of nibbles
};

/** True when kvpack can dequantize this ggml type. */
export function isSupportedGgmlType(type: number): boolean {
  return LAYOUT[type] !== undefined;
}

/**
 * Bytes a tensor of `count` elements takes.
 * @param rowLength ne[0], the fastest dimension (blocks never straddle rows)
 * @throws KvpackError('unsupported') for an unsupported type; ('shape') when ne[0] is not a
 *         multiple of the block size.
 */
export function ggmlTensorBytes(type: number, count: number, rowLength: number, tensorName: string, file: string): number {
  const l = LAYOUT[type];
  if (!l)
    throw new KvpackError(
      'unsupported',
      `${file}: tensor "${tensorName}" has GGML type ${ggmlTypeName(type)}; kvpack dequantizes F32, F16, BF16, Q8_0 and Q4_0`,
    );
  check(rowLength % l.block === 0, 'shape', `${file}: tensor "${tensorName}" (${ggmlTypeName(type)}) has ne[0] = ${rowLength}, not a multiple of its block size ${l.block}`);
  return (count / l.block) * l.bytes;
}

/**
 * Dequantizes `count` elements of a ggml tensor to float32 (ggml-quants.c `dequantize_row_*`):
 * - Q8_0: blocks of 32: f16 scale d, then 32 int8 q; value = q·d.
 * - Q4_0: blocks of 32: f16 scale d, then 16 bytes; byte j holds element j in its low nibble and
 *   element j + 16 in its high nibble; value = (nibble − 8)·d.
 * - F16 / BF16 / F32: converted.
 * @param bytes the tensor's bytes (any alignment)
 */
export function dequantizeGgml(type: number, bytes: Uint8Array, count: number): Float32Array {
  switch (type) {
    case GGML_TYPE.F32: {
      const b = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
      return new Float32Array(b.buffer, b.byteOffset, count).slice();
    }
    case GGML_TYPE.F16:
    case GGML_TYPE.BF16: {
      const b = bytes.byteOffset % 2 === 0 ? bytes : bytes.slice();
      const u16 = new Uint16Array(b.buffer, b.byteOffset, count);
      return type === GGML_TYPE.F16 ? decodeHalf(u16) : decodeBFloat16(u16);
    }
    case GGML_TYPE.Q8_0: {
      const out = new Float32Array(count);
      const i8 = new Int8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      for (let blk = 0, o = 0, p = 0; o < count; blk++, p += 34) {
        const d = fromHalfBits(bytes[p] | (bytes[p + 1] << 8));
        for (let j = 0; j < 32; j++) out[o++] = i8[p + 2 + j] * d;
      }
      return out;
    }
    case GGML_TYPE.Q4_0: {
      const out = new Float32Array(count);
      for (let o = 0, p = 0; o < count; o += 32, p += 18) {
        const d = fromHalfBits(bytes[p] | (bytes[p + 1] << 8));
        for (let j = 0; j < 16; j++) {
          const q = bytes[p + 2 + j];
          out[o + j] = ((q & 0x0f) - 8) * d;
          out[o + j + 16] = ((q >> 4) - 8) * d;
        }
      }
      return out;
    }
    default:
      throw new KvpackError('unsupported', `GGML type ${ggmlTypeName(type)} cannot be dequantized`);
  }
}
