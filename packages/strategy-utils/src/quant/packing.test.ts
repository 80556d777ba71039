import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { PackedCodes, packCodes, unpackCodes } from './packing.js';

describe('bit packing', () => {
  it('puts element i at bits i·b … i·b + b − 1, lowest first (closed form)', () => {
    expect(Array.from(packCodes([1, 2, 3, 0, 3], 2))).toEqual([0b00111001, 0b11]);
    expect(Array.from(packCodes([0xa, 0x5, 0xf], 4))).toEqual([0x5a, 0x0f]);
    expect(Array.from(packCodes([200, 7], 8))).toEqual([200, 7]);
  });

  it('round-trips any codes at 1, 2, 4 and 8 bits, also when appended in blocks', () => {
    fc.assert(
      fc.property(fc.constantFrom(1 as const, 2 as const, 4 as const, 8 as const), fc.array(fc.array(fc.nat(255), { maxLength: 40 }), { maxLength: 5 }), (bits, blocks) => {
        const mask = (1 << bits) - 1;
        const all = blocks.flat().map((c) => c & mask);
        const p = new PackedCodes(bits);
        for (const b of blocks) p.push(b.map((c) => c & mask));
        expect(p.bytes().length).toBe(Math.ceil((all.length * bits) / 8));
        expect(Array.from(p.unpack())).toEqual(all);
        expect(Array.from(unpackCodes(packCodes(all, bits), bits, all.length))).toEqual(all);
        // Any range, byte-aligned or not (the decoder's leading, whole-byte and trailing parts).
        for (let start = 0; start <= Math.min(all.length, 5); start++) expect(Array.from(p.unpack(start, all.length - start))).toEqual(all.slice(start));
      }),
      { seed: 11, numRuns: 200 },
    );
  });

  it('refuses bytes that cannot hold the codes', () => {
    expect(() => unpackCodes(new Uint8Array(2), 4, 5)).toThrow(/2 bytes cannot hold exactly 5 4-bit codes/);
  });
});
