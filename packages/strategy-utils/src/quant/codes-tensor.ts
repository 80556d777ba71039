import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, check, isWebGpuBackend, readSyncOrExplain, runFlatWgsl, wgslFlatIndex, type StoredItem } from '@kvpack/core';
import { decodeCodes } from './packing.js';
import { concatWords } from './words.js';

/**
 * Unsigned b-bit codes (b = 1, 2, 4 or 8) held on a tfjs backend in their packed form: the bytes of
 * {@link packCodes} (code i at bits i·b … i·b + b − 1, lowest first) as little-endian int32 words,
 * ⌈⌈n·b/8⌉/4⌉·4 bytes for n codes. {@link unpack} makes a transient float32 tensor of the codes for
 * compute (a WGSL kernel on webgpu; one readback and a host decode elsewhere).
 */
export class CodesTensor {
  private constructor(
    /** The packed words, int32 [⌈bytes/4⌉]. */
    readonly packed: tf.Tensor1D,
    readonly bits: 1 | 2 | 4 | 8,
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
  static fromBytes(bytes: Uint8Array, bits: 1 | 2 | 4 | 8, count: number): CodesTensor {
    const n = Math.ceil((count * bits) / 8);
    check(bytes.length === n, 'shape', `packed codes: ${bytes.length} bytes cannot hold exactly ${count} ${bits}-bit codes`);
    const words = new Int32Array(Math.max(1, Math.ceil(n / 4)));
    new Uint8Array(words.buffer).set(bytes);
    return new CodesTensor(tf.tensor1d(words, 'int32'), bits, count);
  }

  /**
   * Wraps packed words already on the backend (int32 [⌈⌈count·bits/8⌉/4⌉], at least one); takes
   * ownership of `words`.
   * @throws KvpackError('shape') when `words` is not that.
   */
  static fromPacked(words: tf.Tensor1D, bits: 1 | 2 | 4 | 8, count: number): CodesTensor {
    const n = Math.max(1, Math.ceil(Math.ceil((count * bits) / 8) / 4));
    check(words.dtype === 'int32' && words.rank === 1 && words.size === n, 'shape', `packed codes: ${words.dtype} [${words.shape}] are not the ${n} int32 words of ${count} ${bits}-bit codes`);
    return new CodesTensor(words, bits, count);
  }

  /**
   * Packs codes computed on the backend (a float32 or int32 tensor of integers in [0, 2^bits), any
   * shape, row-major) into their stored form without a host round trip: a WGSL kernel on webgpu,
   * exact integer tf ops elsewhere (each 16-bit half of a word summed in float32, then joined in
   * int32). Bit-identical to {@link packCodes}. Does not dispose `codes`.
   */
  static pack(codes: tf.Tensor, bits: 1 | 2 | 4 | 8): CodesTensor {
    const count = codes.size;
    const per = 32 / bits;
    const words = Math.max(1, Math.ceil(count / per));
    if (count === 0) return new CodesTensor(tf.zeros([1], 'int32') as tf.Tensor1D, bits, 0);
    if (isWebGpuBackend()) {
      const flat = tf.reshape(codes, [count]) as tf.Tensor1D;
      try {
        return new CodesTensor(packWordsOnDevice(flat, bits, words), bits, count);
      } finally {
        flat.dispose();
      }
    }
    const packed = tf.tidy(() => {
      const half = per / 2;
      let c = tf.cast(tf.reshape(codes, [count]), 'float32');
      if (words * per > count) c = tf.concat([c, tf.zeros([words * per - count])]);
      const weights = tf.tensor1d(Float32Array.from({ length: half }, (_, j) => 2 ** (bits * j)));
      // [words, 2, half] codes · 2^(b·j) summed: the low and high 16 bits of each word, exact in float32.
      const halves = tf.sum(tf.mul(tf.reshape(c, [words, 2, half]), weights), 2);
      const [lo, hi] = tf.unstack(halves, 1);
      // The high half as a signed 16-bit value, so that hi · 2^16 + lo is the int32 word without overflow.
      const hiSigned = tf.sub(hi, tf.mul(tf.cast(tf.greaterEqual(hi, 32768), 'float32'), 65536));
      return tf.add(tf.mul(tf.cast(hiSigned, 'int32'), tf.scalar(65536, 'int32')), tf.cast(lo, 'int32')) as tf.Tensor1D;
    });
    return new CodesTensor(packed, bits, count);
  }

  /**
   * The codes of `a` then `b`, a new tensor (neither is disposed). When a's codes end on a word
   * boundary the packed words are joined as they are; otherwise both are unpacked and repacked on the
   * backend.
   * @throws KvpackError('shape') when the widths differ.
   */
  static concat(a: CodesTensor, b: CodesTensor): CodesTensor {
    check(a.bits === b.bits, 'shape', `packed codes of ${a.bits} and ${b.bits} bits cannot be joined`);
    check(!a.isDisposed && !b.isDisposed, 'disposed', 'packed codes were disposed');
    const { bits } = a;
    if (a.count === 0) return new CodesTensor(tf.clone(b.packed), bits, b.count);
    if (b.count === 0) return new CodesTensor(tf.clone(a.packed), bits, a.count);
    if ((a.count * bits) % 32 === 0) return new CodesTensor(concatWords(a.packed, b.packed), bits, a.count + b.count);
    const joined = tf.tidy(() => tf.concat([a.unpack(), b.unpack()]));
    try {
      return CodesTensor.pack(joined, bits);
    } finally {
      joined.dispose();
    }
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
    return runFlatWgsl({
      key: `unpack_codes_${this.bits}`,
      names: ['w'],
      inputs: [this.packed],
      outputShape: [this.count],
      dtype: 'float32',
      invocations: this.count,
      code: `fn kernel(index: i32) {
  ${wgslFlatIndex('i')}
  if (i >= uniforms.outShape) { return; }
  let bit = u32(i) * ${this.bits}u;
  let word = bitcast<u32>(w[bit / 32u]);
  result[i] = f32((word >> (bit % 32u)) & ${(1 << this.bits) - 1}u);
}`,
    }) as tf.Tensor1D;
  }

  /** The host decode (wasm, cpu, tensorflow): one read of the packed words, decoded by {@link decodeCodes}. */
  private unpackOnHost(): tf.Tensor1D {
    const words = readSyncOrExplain(this.packed, 'packed codes', 'use await cache.serializeAsync()') as unknown as Int32Array;
    const bytes = new Uint8Array(words.buffer, words.byteOffset, this.byteLength);
    return tf.tensor1d(decodeCodes(bytes, this.bits, 0, this.count, new Float32Array(this.count)), 'float32');
  }

  /** Frees the packed tensor. Idempotent. */
  dispose(): void {
    if (!this.packed.isDisposed) this.packed.dispose();
  }
}

/** Packs float32 codes [n] into `words` int32 words on webgpu (one invocation per word). */
function packWordsOnDevice(codes: tf.Tensor1D, bits: 1 | 2 | 4 | 8, words: number): tf.Tensor1D {
  const per = 32 / bits;
  return runFlatWgsl({
    key: `pack_codes_${bits}`,
    names: ['c'],
    inputs: [codes],
    outputShape: [words],
    dtype: 'int32',
    invocations: words,
    code: `fn kernel(index: i32) {
  ${wgslFlatIndex('w')}
  if (w >= uniforms.outShape) { return; }
  var word = 0u;
  for (var j = 0; j < ${per}; j++) {
    let i = w * ${per} + j;
    if (i < uniforms.cShape) { word = word | ((u32(c[i]) & ${(1 << bits) - 1}u) << (u32(j) * ${bits}u)); }
  }
  result[w] = bitcast<i32>(word);
}`,
  }) as tf.Tensor1D;
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
