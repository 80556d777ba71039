import * as zlib from 'node:zlib';

/** CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) lookup table, one entry per byte value. */
let table: Uint32Array | undefined;

function crcTable(): Uint32Array {
  if (table) return table;
  table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
}

/**
 * CRC-32 of `bytes` in JavaScript, continuing from `initial` (the CRC of the bytes before): the same
 * value as Node's `zlib.crc32(bytes, initial)`, for Node releases before 20.15 that lack it.
 */
export function tableCrc32(bytes: Uint8Array, initial = 0): number {
  const t = crcTable();
  let c = (initial ^ 0xffffffff) >>> 0;
  for (let i = 0; i < bytes.length; i++) c = t[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

type Crc32 = (bytes: Uint8Array, initial?: number) => number;
const native = (zlib as unknown as { crc32?: Crc32 }).crc32;

/**
 * CRC-32 of `bytes`, continuing from `initial`: `zlib.crc32` where Node has it (20.15 and later,
 * native speed), else {@link tableCrc32}. The two give identical values.
 */
export const crc32: Crc32 = typeof native === 'function' ? (bytes, initial = 0) => native(bytes, initial) : tableCrc32;
