import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, type StoredItem } from '@kvpack/core';
import {
  CodesTensor,
  PackedCodes,
  concatHalfRows,
  dequantizeMinMaxOnBackend,
  minMaxGroupShape,
  unpackCodes,
  type HeldMinMax,
  type MinMaxGrouping,
} from '@kvpack/strategy-utils';

/** How a sequence of quantized tokens is grouped, and when its recent tail joins the main segment. */
export interface HeldBlocksLayout {
  along: MinMaxGrouping;
  bits: 2 | 4;
  H: number;
  d: number;
  g: number;
  /** A tail that reaches this many tokens is merged into the main segment. */
  tailTokens: number;
}

/** A run of quantized tokens on the backend, in its stored form. */
type Segment = HeldMinMax;

/** A segment's stored form on the host: packed code bytes and float16 bits. */
interface HostSegment {
  tokens: number;
  codes: Uint8Array;
  scale: Uint16Array;
  min: Uint16Array;
}

function disposeSegment(s: Segment | null): void {
  s?.codes.dispose();
  s?.scale.dispose();
  s?.min.dispose();
}

export function concat16(a: Uint16Array, b: Uint16Array): Uint16Array {
  const out = new Uint16Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

/**
 * The quantized tokens of one KIVI layer's keys or values, held on the backend only in their stored
 * form: packed b-bit codes and float16 scale and minimum per group, as at most two segments — the
 * main one and a recent tail. Decode-time blocks (quantized on the backend) join the tail, which is
 * rebuilt on the backend (O(tail)); once it reaches `tailTokens` it is merged into the main segment
 * (O(all), once per `tailTokens` tokens); joins run on the backend ({@link CodesTensor.concat},
 * {@link concatHalfRows}). Reading dequantizes each segment with tf ops
 * ({@link dequantizeMinMaxOnBackend}) into a transient float32 tensor. The serialized form (codes,
 * scale, min of all tokens, in order) does not depend on how the tokens are split.
 */
export class HeldMinMaxBlocks {
  private main: Segment | null = null;
  private tail: Segment | null = null;

  constructor(private readonly p: HeldBlocksLayout) {}

  /**
   * Uploads stored bytes (packed codes, float16 scale and min bits of `tokens` tokens) as one segment,
   * without decoding them.
   */
  static fromStored(p: HeldBlocksLayout, stored: HostSegment): HeldMinMaxBlocks {
    const b = new HeldMinMaxBlocks(p);
    if (stored.tokens > 0) b.main = b.upload(stored);
    return b;
  }

  /** Quantized tokens held. */
  get tokens(): number {
    return (this.main?.tokens ?? 0) + (this.tail?.tokens ?? 0);
  }

  /** Shape of the scale (and min) of all held tokens. */
  groupShape(): number[] {
    const { along, H, d, g } = this.p;
    return minMaxGroupShape(along, this.tokens, H, d, g);
  }

  private upload(h: HostSegment): Segment {
    const { along, bits, H, d, g } = this.p;
    const shape = minMaxGroupShape(along, h.tokens, H, d, g);
    const made: { dispose(): void }[] = [];
    try {
      const codes = CodesTensor.fromBytes(h.codes, bits, h.tokens * H * d);
      made.push(codes);
      const scale = HalfTensor.fromBits(h.scale, shape);
      made.push(scale);
      const min = HalfTensor.fromBits(h.min, shape);
      return { tokens: h.tokens, codes, scale, min };
    } catch (e) {
      made.forEach((t) => t.dispose());
      throw e;
    }
  }

  /** Packed codes of a then b (bit-level: a's last byte may be partly filled). */
  private joinCodes(a: Uint8Array, aTokens: number, b: Uint8Array, bTokens: number): Uint8Array {
    const { bits, H, d } = this.p;
    if (((aTokens * H * d * bits) & 7) === 0) {
      const out = new Uint8Array(a.length + b.length);
      out.set(a);
      out.set(b, a.length);
      return out;
    }
    const p = new PackedCodes(bits, { bytes: a, count: aTokens * H * d });
    p.push(unpackCodes(b, bits, bTokens * H * d));
    return p.bytes();
  }

  /** a then b, a new segment on the backend (neither is disposed). */
  private join(a: Segment, b: Segment): Segment {
    const made: { dispose(): void }[] = [];
    try {
      const codes = CodesTensor.concat(a.codes, b.codes);
      made.push(codes);
      const scale = concatHalfRows(a.scale, b.scale);
      made.push(scale);
      const min = concatHalfRows(a.min, b.min);
      return { tokens: a.tokens + b.tokens, codes, scale, min };
    } catch (e) {
      made.forEach((t) => t.dispose());
      throw e;
    }
  }

  /**
   * Appends a block quantized on the backend (taking ownership of its tensors), without a host round
   * trip. Nothing changes if it throws (the block is then disposed).
   */
  push(add: Segment): void {
    try {
      if (!this.main) {
        this.main = add;
        return;
      }
      if (!this.tail) {
        if (add.tokens < this.p.tailTokens) {
          this.tail = add;
          return;
        }
        const main = this.join(this.main, add);
        disposeSegment(this.main);
        disposeSegment(add);
        this.main = main;
        return;
      }
      const tail = this.join(this.tail, add);
      disposeSegment(add);
      if (tail.tokens < this.p.tailTokens) {
        disposeSegment(this.tail);
        this.tail = tail;
        return;
      }
      let main: Segment;
      try {
        main = this.join(this.main, tail);
      } finally {
        disposeSegment(tail);
      }
      disposeSegment(this.main);
      disposeSegment(this.tail);
      this.main = main;
      this.tail = null;
    } catch (e) {
      disposeSegment(add);
      throw e;
    }
  }

  /** The held tokens dequantized, a transient float32 [tokens, H, d] owned by the caller; null when none. */
  dequantize(): tf.Tensor3D | null {
    const { along, H, d, g } = this.p;
    const segs = [this.main, this.tail].filter((s): s is Segment => s !== null);
    if (segs.length === 0) return null;
    return tf.tidy(() => {
      const parts = segs.map((s) => dequantizeMinMaxOnBackend({ along, n: s.tokens, H, d, g }, s.codes, s.scale, s.min));
      return parts.length === 1 ? parts[0] : tf.concat(parts, 0);
    });
  }

  /**
   * The stored items `prefix.codes` (uint8, ⌈n·H·d·b/8⌉ bytes), `prefix.scale` and `prefix.min`
   * (float16, {@link groupShape}); their data is read back only when a serialization writes it.
   */
  items(prefix: string): StoredItem[] {
    const { bits, H, d } = this.p;
    const n = this.tokens;
    const backing = this.packed();
    const codes: StoredItem = {
      name: `${prefix}.codes`,
      dtype: 'uint8',
      shape: [Math.ceil((n * H * d * bits) / 8)],
      backing,
      read: () => {
        const [a, b] = [this.main, this.tail];
        if (!a) return new Uint8Array(0);
        const bytes = a.codes.bytesSync(`tensor "${prefix}.codes"`);
        return b ? this.joinCodes(bytes, a.tokens, b.codes.bytesSync(`tensor "${prefix}.codes"`), b.tokens) : bytes;
      },
    };
    const half = (name: 'scale' | 'min'): StoredItem => ({
      name: `${prefix}.${name}`,
      dtype: 'float16',
      shape: this.groupShape(),
      backing,
      read: () => {
        const parts = [this.main, this.tail].filter((s): s is Segment => s !== null).map((s) => s[name].bitsSync(`tensor "${prefix}.${name}"`));
        return parts.length === 0 ? new Uint16Array(0) : parts.length === 1 ? parts[0] : concat16(parts[0], parts[1]);
      },
    });
    return [codes, half('scale'), half('min')];
  }

  /** The backend tensors held (for an asynchronous readback before serializing). */
  packed(): tf.Tensor[] {
    return [this.main, this.tail].filter((s): s is Segment => s !== null).flatMap((s) => [s.codes.packed, s.scale.packed, s.min.packed]);
  }

  dispose(): void {
    disposeSegment(this.main);
    disposeSegment(this.tail);
    this.main = null;
    this.tail = null;
  }
}
