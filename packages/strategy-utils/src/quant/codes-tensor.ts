import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, check, isWebGpuBackend, readSyncOrExplain, runWgsl, type StoredItem } from '@kvpack/core';

/**
 * Unsigned b-bit codes (b = 2, 4 or 8) held on a tfjs backend in their packed form: the bytes of
 * {@link packCodes} (code i at bits i·b … i·b + b − 1, lowest first) as little-endian int32 words,
 * ⌈⌈n·b/8⌉/4⌉·4 bytes for n codes. {@link unpack} makes a transient float32 tensor of the codes for
 * compute (a WGSL kernel on webgpu; one readback and a host decode elsewhere).
 */
export class CodesTensor {
  private constructor(
    /** The packed words, int32 [⌈bytes/4⌉]. */
    readonly packed: tf.Tensor1D,
    readonly bits: 2 | 4 | 8,
    /** Number of codes n. */
    readonly count: number,
  ) {}

  /** Bytes of the packed codes, ⌈n·b/8⌉ (what a serialization stores). */
  get byteLength(): number {
    return Math.ceil((this.count * this.bits) / 8);
  }

  /** Bytes held on the backend: the packed bytes rounded up to whole int32 words. */
  get residentBytes(): number {
    return this.packed.size * 4;
  }

  get isDisposed(): boolean {
    return this.packed.isDisposed;
  }

  /**
   * Uploads packed code bytes as they are stored (no decode).
   * @throws KvpackError('shape') when `bytes` is not ⌈count·bits/8⌉ long.
   */
  static fromBytes(bytes: Uint8Array, bits: 2 | 4 | 8, count: number): CodesTensor {
    const n = Math.ceil((count * bits) / 8);
    check(bytes.length === n, 'shape', `packed codes: ${bytes.length} bytes cannot hold exactly ${count} ${bits}-bit codes`);
    const words = new Int32Array(Math.max(1, Math.ceil(n / 4)));
    new Uint8Array(words.buffer).set(bytes);
    return new CodesTensor(tf.tensor1d(words, 'int32'), bits, count);
  }

  /** The packed bytes (a synchronous readback). */
  bytesSync(what = 'packed codes'): Uint8Array {
    check(!this.isDisposed, 'disposed', `${what} were disposed`);
    const words = Int32Array.from(readSyncOrExplain(this.packed, what, 'use await cache.serializeAsync()') as unknown as Int32Array);
    return new Uint8Array(words.buffer, 0, this.byteLength);
  }

  /**
   * The codes as a transient float32 tensor [n] (exact: codes < 256), owned by the caller.
   */
  unpack(): tf.Tensor1D {
    check(!this.isDisposed, 'disposed', 'packed codes were disposed');
    if (this.count === 0) return tf.tensor1d([], 'float32');
    if (!isWebGpuBackend()) return this.unpackOnHost();
    const WG = 256;
    const groups = Math.ceil(this.count / WG);
    const x = Math.min(groups, 65535);
    return runWgsl({
      key: `unpack_codes_${this.bits}`,
      names: ['w'],
      inputs: [this.packed],
      outputShape: [this.count],
      dtype: 'float32',
      workgroupSize: WG,
      dispatch: [x, Math.ceil(groups / x), 1],
      workgroupBytes: 0,
      code: `fn kernel(index: i32) {
  let i = (i32(workgroupId.y) * i32(numWorkgroups.x) + i32(workgroupId.x)) * ${WG} + i32(localId.x);
  if (i >= uniforms.outShape) { return; }
  let bit = u32(i) * ${this.bits}u;
  let word = bitcast<u32>(w[bit / 32u]);
  result[i] = f32((word >> (bit % 32u)) & ${(1 << this.bits) - 1}u);
}`,
    }) as tf.Tensor1D;
  }

  /**
   * The host decode: the packed int32 words are read once and unpacked word by word straight into a
   * float32 array (whole words unrolled, then the last partial word).
   */
  private unpackOnHost(): tf.Tensor1D {
    const words = readSyncOrExplain(this.packed, 'packed codes', 'use await cache.serializeAsync()') as unknown as Int32Array;
      const { bits, count: n } = this;
    const out = new Float32Array(n);
    const per = 32 / bits;
    const mask = (1 << bits) - 1;
    // Whole words unrolled (the common case), then the last partial word.
    const full = Math.floor(n / per);
    if (bits === 4) {
      for (let w = 0, o = 0; w < full; w++, o += 8) {
        const x = words[w];
        out[o] = x & 15;
        out[o + 1] = (x >>> 4) & 15;
        out[o + 2] = (x >>> 8) & 15;
        out[o + 3] = (x >>> 12) & 15;
        out[o + 4] = (x >>> 16) & 15;
        out[o + 5] = (x >>> 20) & 15;
        out[o + 6] = (x >>> 24) & 15;
        out[o + 7] = x >>> 28;
      }
    } else if (bits === 8) {
      for (let w = 0, o = 0; w < full; w++, o += 4) {
        const x = words[w];
        out[o] = x & 255;
        out[o + 1] = (x >>> 8) & 255;
        out[o + 2] = (x >>> 16) & 255;
        out[o + 3] = x >>> 24;
      }
    } else {
      for (let w = 0, o = 0; w < full; w++) {
        let x = words[w];
        for (let j = 0; j < 16; j++, o++) {
          out[o] = x & 3;
          x >>>= 2;
        }
      }
    }
    let i = full * per;
    for (let w = full; i < n; w++) {
      let x = words[w];
      const end = Math.min(n, i + per);
      for (; i < end; i++) {
        out[i] = x & mask;
        x >>>= bits;
      }
    }
    return tf.tensor1d(out, 'float32');
  }

  /** Frees the packed tensor. Idempotent. */
  dispose(): void {
    if (!this.packed.isDisposed) this.packed.dispose();
  }
}

/**
 * Dequantizes a group-quantized [rows, cols] matrix held on the backend (codes, float16 scales and,
 * asymmetric, uint8 zero points, each group `quantGroupSize` consecutive elements of a row, the last
 * group of a row possibly shorter): x = (u + q_lo − zero) · scale, with q_lo = −2^(b−1) symmetric and
 * 0 asymmetric. A transient float32 tensor [rows, cols], bit-identical to the host
 * `dequantizeMatrix` (every factor is exact in float32, and the product is rounded once).
 */
export function dequantizeOnBackend(
  m: { rows: number; cols: number; bits: 4 | 8; quantGroupSize: number; symmetric: boolean },
  codes: CodesTensor,
  scales: HalfTensor,
  zeros: CodesTensor | null,
): tf.Tensor2D {
  const { rows, cols, bits, quantGroupSize: gs, symmetric } = m;
  const gpr = Math.ceil(cols / gs);
  const qLo = symmetric ? -(2 ** (bits - 1)) : 0;
  const shift = (u: tf.Tensor) => (qLo === 0 ? u : tf.add(u, qLo));
  if (cols % gs === 0) {
    // Whole groups: codes [rows, groups, gs] against scales and zero points [rows, groups, 1].
    return tf.tidy(() => {
      const u = shift(tf.reshape(codes.unpack(), [rows, gpr, gs]));
      const level = zeros ? tf.sub(u, tf.reshape(zeros.unpack(), [rows, gpr, 1])) : u;
      return tf.reshape(tf.mul(level, tf.reshape(scales.unpack(), [rows, gpr, 1])), [rows, cols]) as tf.Tensor2D;
    });
  }
  // A shorter last group: each column's group parameters gathered.
  const colGroup = Int32Array.from({ length: cols }, (_, c) => Math.floor(c / gs));
  return tf.tidy(() => {
    const idx = tf.tensor1d(colGroup, 'int32');
    const perCol = (t: tf.Tensor) => tf.gather(tf.reshape(t, [rows, gpr]), idx, 1);
    const u = shift(tf.reshape(codes.unpack(), [rows, cols]));
    const level = zeros ? tf.sub(u, perCol(zeros.unpack())) : u;
    return tf.mul(level, perCol(scales.unpack())) as tf.Tensor2D;
  });
}

/**
 * Packed codes as a stored item: uint8 [⌈n·b/8⌉], read back from the backend only when a
 * serialization writes it.
 */
export function codesItem(name: string, codes: CodesTensor): StoredItem {
  return { name, dtype: 'uint8', shape: [codes.byteLength], backing: [codes.packed], read: () => codes.bytesSync(`tensor "${name}"`) };
}
