import { crc32 as zlibCrc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { crc32, tableCrc32 } from './crc32.js';

describe('crc32 fallback (Node releases before 20.15 lack zlib.crc32)', () => {
  it('matches the published check value and zlib.crc32, also when continued from a prior CRC', () => {
    const check = new TextEncoder().encode('123456789');
    expect(tableCrc32(check)).toBe(0xcbf43926); // the CRC-32/ISO-HDLC check value
    expect(tableCrc32(new Uint8Array(0))).toBe(0);
    let seed = 7;
    const bytes = new Uint8Array(4099).map(() => (seed = (seed * 1103515245 + 12345) >>> 0) >>> 24);
    expect(tableCrc32(bytes)).toBe(zlibCrc32(bytes));
    const head = bytes.subarray(0, 1000);
    const tail = bytes.subarray(1000);
    expect(tableCrc32(tail, tableCrc32(head))).toBe(zlibCrc32(bytes));
    expect(crc32(tail, crc32(head))).toBe(zlibCrc32(bytes));
  });
});
