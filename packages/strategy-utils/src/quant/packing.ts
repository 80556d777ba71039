import { check } from '@kvpack/core';

/**
 * Bit-packing of unsigned b-bit codes (b = 2, 4 or 8) into bytes: element i occupies bits
 * (i·b) mod 8 … (i·b) mod 8 + b − 1 of byte ⌊i·b / 8⌋, lowest bits first (so 4-bit codes sit two per
 * byte with the even element in the low nibble, and 2-bit codes four
 * per byte). A growable buffer, so decode-time blocks append in O(block).
 */
export class PackedCodes {
  private buf: Uint8Array;
  private n = 0;

  constructor(
    readonly bits: 2 | 4 | 8,
    initial?: { bytes: Uint8Array; count: number },
  ) {
    check(bits === 2 || bits === 4 || bits === 8, 'config', `packed codes: bits must be 2, 4 or 8, got ${bits}`);
    if (initial) {
      check(
        initial.bytes.length === Math.ceil((initial.count * bits) / 8),
        'corrupt',
        `packed codes: ${initial.bytes.length} bytes cannot hold exactly ${initial.count} ${bits}-bit codes`,
      );
      this.buf = Uint8Array.from(initial.bytes);
      this.n = initial.count;
    } else {
      this.buf = new Uint8Array(64);
    }
  }

  /** Number of codes held. */
  get count(): number {
    return this.n;
  }

  /** Appends codes (each in [0, 2^bits)). */
  push(codes: ArrayLike<number>): void {
    const b = this.bits;
    const need = Math.ceil(((this.n + codes.length) * b) / 8);
    if (need > this.buf.length) {
      const next = new Uint8Array(Math.max(need, this.buf.length * 2));
      next.set(this.buf.subarray(0, Math.ceil((this.n * b) / 8)));
      this.buf = next;
    }
    const mask = (1 << b) - 1;
    for (let i = 0; i < codes.length; i++) {
      const bit = (this.n + i) * b;
      this.buf[bit >> 3] |= (codes[i] & mask) << (bit & 7);
    }
    this.n += codes.length;
  }

  /** Codes [start, start + count) as one byte each. */
  unpack(start = 0, count = this.n - start): Uint8Array {
    check(start >= 0 && count >= 0 && start + count <= this.n, 'shape', `packed codes: range [${start}, ${start + count}) is outside [0, ${this.n})`);
    const b = this.bits;
    const mask = (1 << b) - 1;
    const out = new Uint8Array(count);
    for (let i = 0; i < count; i++) {
      const bit = (start + i) * b;
      out[i] = (this.buf[bit >> 3] >> (bit & 7)) & mask;
    }
    return out;
  }

  /** The packed bytes, ⌈count·bits/8⌉ of them (a copy). */
  bytes(): Uint8Array {
    return this.buf.slice(0, Math.ceil((this.n * this.bits) / 8));
  }
}

/** Packs codes into ⌈n·bits/8⌉ bytes (see {@link PackedCodes} for the layout). */
export function packCodes(codes: ArrayLike<number>, bits: 2 | 4 | 8): Uint8Array {
  const p = new PackedCodes(bits);
  p.push(codes);
  return p.bytes();
}

/** Unpacks `count` codes written by {@link packCodes}. @throws KvpackError('corrupt') on a size mismatch. */
export function unpackCodes(bytes: Uint8Array, bits: 2 | 4 | 8, count: number): Uint8Array {
  return new PackedCodes(bits, { bytes, count }).unpack();
}
