import { check } from '@kvpack/core';

/**
 * Bit-packing of unsigned b-bit codes (b = 1, 2, 4 or 8) into bytes: element i occupies bits
 * (i·b) mod 8 … (i·b) mod 8 + b − 1 of byte ⌊i·b / 8⌋, lowest bits first (so 4-bit codes sit two per
 * byte with the even element in the low nibble, and 2-bit codes four
 * per byte, 1-bit codes eight). A growable buffer, so decode-time blocks append in O(block).
 */
export class PackedCodes {
  private buf: Uint8Array;
  private n = 0;

  constructor(
    readonly bits: 1 | 2 | 4 | 8,
    initial?: { bytes: Uint8Array; count: number },
  ) {
    check(bits === 1 || bits === 2 || bits === 4 || bits === 8, 'config', `packed codes: bits must be 1, 2, 4 or 8, got ${bits}`);
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
    return decodeCodes(this.buf, this.bits, start, count, new Uint8Array(count));
  }

  /** The packed bytes, ⌈count·bits/8⌉ of them (a copy). */
  bytes(): Uint8Array {
    return this.buf.slice(0, Math.ceil((this.n * this.bits) / 8));
  }
}

/** Packs codes into ⌈n·bits/8⌉ bytes (see {@link PackedCodes} for the layout). */
export function packCodes(codes: ArrayLike<number>, bits: 1 | 2 | 4 | 8): Uint8Array {
  const p = new PackedCodes(bits);
  p.push(codes);
  return p.bytes();
}

/** Unpacks `count` codes written by {@link packCodes}. @throws KvpackError('corrupt') on a size mismatch. */
export function unpackCodes(bytes: Uint8Array, bits: 1 | 2 | 4 | 8, count: number): Uint8Array {
  check(bytes.length === Math.ceil((count * bits) / 8), 'corrupt', `packed codes: ${bytes.length} bytes cannot hold exactly ${count} ${bits}-bit codes`);
  return decodeCodes(bytes, bits, 0, count, new Uint8Array(count));
}

/**
 * The host decoder of the packed layout (the one place it is written): codes start … start + count − 1
 * of `bytes` into `out[0 … count − 1]`, whole bytes at a time once byte-aligned. Returns `out`.
 */
export function decodeCodes<T extends Uint8Array | Float32Array>(bytes: Uint8Array, bits: 1 | 2 | 4 | 8, start: number, count: number, out: T): T {
  const mask = (1 << bits) - 1;
  const one = (i: number) => {
    const bit = (start + i) * bits;
    out[i] = (bytes[bit >> 3] >> (bit & 7)) & mask;
  };
  let i = 0;
  for (; i < count && (((start + i) * bits) & 7) !== 0; i++) one(i);
  const per = 8 / bits;
  const whole = Math.floor((count - i) / per);
  let at = ((start + i) * bits) >> 3;
  if (bits === 8) {
    out.set(bytes.subarray(at, at + whole), i);
    i += whole;
  } else if (bits === 4) {
    for (let k = 0; k < whole; k++, at++, i += 2) {
      const x = bytes[at];
      out[i] = x & 15;
      out[i + 1] = x >> 4;
    }
  } else if (bits === 1) {
    for (let k = 0; k < whole; k++, at++, i += 8) {
      const x = bytes[at];
      for (let j = 0; j < 8; j++) out[i + j] = (x >> j) & 1;
    }
  } else {
    for (let k = 0; k < whole; k++, at++, i += 4) {
      const x = bytes[at];
      out[i] = x & 3;
      out[i + 1] = (x >> 2) & 3;
      out[i + 2] = (x >> 4) & 3;
      out[i + 3] = x >> 6;
    }
  }
  for (; i < count; i++) one(i);
  return out;
}
