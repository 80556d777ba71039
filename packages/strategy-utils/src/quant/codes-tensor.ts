import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, check, isWebGpuBackend, readSyncOrExplain, runWgsl } from '@kvpack/core';
import { unpackCodes } from './packing.js';

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
    if (!isWebGpuBackend()) return tf.tensor1d(Float32Array.from(unpackCodes(this.bytesSync(), this.bits, this.count)), 'float32');
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
  const colGroup = Int32Array.from({ length: cols }, (_, c) => Math.floor(c / gs));
  return tf.tidy(() => {
    const idx = tf.tensor1d(colGroup, 'int32');
    const perCol = (t: tf.Tensor) => tf.gather(tf.reshape(t, [rows, gpr]), idx, 1);
    const u = tf.reshape(codes.unpack(), [rows, cols]);
    const level = zeros ? tf.sub(qLo === 0 ? u : tf.add(u, qLo), perCol(zeros.unpack())) : qLo === 0 ? u : tf.add(u, qLo);
    return tf.mul(level, perCol(scales.unpack())) as tf.Tensor2D;
  });
}
