import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, type StoredItem } from '@kvpack/core';
import {
  CodesTensor,
  PackedCodes,
  dequantizeMinMaxOnBackend,
  minMaxGroupShape,
  packCodes,
  unpackCodes,
  type MinMaxGrouping,
} from '@kvpack/strategy-utils';

/** One quantized block on the host: unpacked codes (one byte each), and float16 bits of the scale and minimum of each group. */
export interface KiviBlock {
  codes: Uint8Array;
  scale: Uint16Array;
  min: Uint16Array;
}

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
interface Segment {
  tokens: number;
  /** Packed codes [tokens, H, d]. */
  codes: CodesTensor;
  /** float16 scale and minimum per group (shape {@link minMaxGroupShape}). */
  scale: HalfTensor;
  min: HalfTensor;
}

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
 * main one and a recent tail. Decode-time blocks (quantized on the host) join the tail, which is
 * rebuilt on the host and re-uploaded (O(tail)); once it reaches `tailTokens` it is merged into the
 * main segment (O(all), once per `tailTokens` tokens). Reading dequantizes each segment with tf ops
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

  private download(s: Segment): HostSegment {
    return { tokens: s.tokens, codes: s.codes.bytesSync('KIVI codes'), scale: s.scale.bitsSync('KIVI scales'), min: s.min.bitsSync('KIVI minima') };
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

  private join(a: HostSegment, b: HostSegment): HostSegment {
    return { tokens: a.tokens + b.tokens, codes: this.joinCodes(a.codes, a.tokens, b.codes, b.tokens), scale: concat16(a.scale, b.scale), min: concat16(a.min, b.min) };
  }

  /**
   * Appends n host-quantized tokens (codes unpacked, one byte each). Synchronous readbacks of the
   * tail (and, at a merge, of the main segment): host backends only. Nothing changes if it throws.
   */
  push(block: KiviBlock, n: number): void {
    const add: HostSegment = { tokens: n, codes: packCodes(block.codes, this.p.bits), scale: block.scale, min: block.min };
    if (!this.main) {
      this.main = this.upload(add);
      return;
    }
    const tail = this.tail ? this.join(this.download(this.tail), add) : add;
    if (tail.tokens < this.p.tailTokens) {
      const next = this.upload(tail);
      disposeSegment(this.tail);
      this.tail = next;
      return;
    }
    const main = this.upload(this.join(this.download(this.main), tail));
    disposeSegment(this.main);
    disposeSegment(this.tail);
    this.main = main;
    this.tail = null;
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
