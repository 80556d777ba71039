import * as tf from '@tensorflow/tfjs-core';
import { check } from './errors.js';
import { decodeHalf, encodeHalf } from './fp16.js';
import { readSyncOrExplain } from './cache.js';
import { isWebGpuBackend, runFlatWgsl, wgslFlatIndex } from './webgpu.js';

/**
 * A float16 tensor as it is held on a tfjs backend, which has no 16-bit dtype: the IEEE binary16 bit
 * patterns packed two to an int32 element (value 2i in the low 16 bits of element i, value 2i + 1 in
 * the high 16 bits; an odd count leaves the last high half zero). It occupies ⌈n/2⌉·4 bytes for n
 * values: what a float16 cache stores, not a float32 copy. {@link unpack} makes a transient float32
 * tensor for compute; WGSL kernels on webgpu can read the packed form directly
 * (`unpack2x16float`).
 */
export class HalfTensor {
  private constructor(
    /** The packed bit patterns, int32 [⌈n/2⌉]. */
    readonly packed: tf.Tensor1D,
    /** Logical shape of the float16 values. */
    readonly shape: number[],
  ) {}

  /** Number of float16 values, n. */
  get size(): number {
    return this.shape.reduce((a, b) => a * b, 1);
  }

  /** Bytes held on the backend: ⌈n/2⌉ · 4. */
  get residentBytes(): number {
    return this.packed.size * 4;
  }

  get isDisposed(): boolean {
    return this.packed.isDisposed;
  }

  /**
   * Packs float16 bit patterns (as stored in a serialization) without decoding them: one upload.
   * @throws KvpackError('shape') when `bits` does not hold exactly the values of `shape`.
   */
  static fromBits(bits: Uint16Array, shape: number[]): HalfTensor {
    const n = shape.reduce((a, b) => a * b, 1);
    check(bits.length === n, 'shape', `float16 data has ${bits.length} values, but shape [${shape}] needs ${n}`);
    const words = new Int32Array(Math.ceil(n / 2));
    new Uint16Array(words.buffer, 0, n).set(bits);
    return new HalfTensor(tf.tensor1d(words, 'int32'), [...shape]);
  }

  /**
   * Rounds a float32 tensor to float16 (round half to even, as {@link roundHalf}) and packs it. On
   * webgpu both run on the device (no host round trip); on the host backends (wasm, cpu) and
   * tensorflow, through one readback. Does not dispose `x`.
   */
  static async fromTensor(x: tf.Tensor): Promise<HalfTensor> {
    if (isWebGpuBackend()) return new HalfTensor(packOnDevice(x), [...x.shape]);
    const data = (await x.data()) as Float32Array;
    return HalfTensor.fromBits(encodeHalf(data), [...x.shape]);
  }

  /**
   * {@link fromTensor} without awaiting, for synchronous code paths (a decode step): on webgpu the same
   * device kernels; on the host backends (wasm, cpu, where the data already lives in host memory) and
   * tensorflow, a synchronous readback. Does not dispose `x`.
   * @throws KvpackError('unsupported') where the backend has no synchronous readback and no device kernel.
   */
  static fromTensorSync(x: tf.Tensor): HalfTensor {
    if (isWebGpuBackend()) return new HalfTensor(packOnDevice(x), [...x.shape]);
    return HalfTensor.fromBits(encodeHalf(readSyncOrExplain(x, 'a float32 tensor to pack as float16', 'use the async HalfTensor.fromTensor')), [...x.shape]);
  }

  /**
   * Wraps packed words already on the backend (int32 [⌈n/2⌉], the layout above) as a float16 tensor
   * of `shape`; takes ownership of `packed`.
   * @throws KvpackError('shape') when `packed` is not int32 [⌈n/2⌉] for the n values of `shape`.
   */
  static fromPacked(packed: tf.Tensor1D, shape: number[]): HalfTensor {
    const n = shape.reduce((a, b) => a * b, 1);
    check(packed.dtype === 'int32' && packed.rank === 1 && packed.size === Math.ceil(n / 2), 'shape', `packed float16 words: ${packed.dtype} [${packed.shape}] cannot hold exactly the ${n} values of shape [${shape}]`);
    return new HalfTensor(packed, [...shape]);
  }

  /** The float16 bit patterns, a caller-owned copy (a synchronous readback; see {@link readSyncOrExplain}). */
  bitsSync(what = 'float16 tensor'): Uint16Array {
    return Uint16Array.from(this.bitsView(what));
  }

  /**
   * The float16 bit patterns without a copy, for reading at once: on wasm a view into its heap (valid
   * until the next tensor is made), elsewhere a view of the synchronous readback.
   */
  bitsView(what = 'float16 tensor'): Uint16Array {
    check(!this.isDisposed, 'disposed', `${what} was disposed`);
    const words =
      tf.getBackend() === 'wasm'
        ? (tf.backend() as unknown as { typedArrayFromHeap(t: tf.Tensor): Int32Array }).typedArrayFromHeap(this.packed)
        : (readSyncOrExplain(this.packed, what, 'use await cache.serializeAsync()') as unknown as Int32Array);
    return new Uint16Array(words.buffer, words.byteOffset, this.size);
  }

  /** The values decoded on the host, float32 [n] (a caller-owned array). */
  valuesSync(what = 'float16 tensor'): Float32Array {
    return decodeHalf(this.bitsView(what));
  }

  /** The float16 bit patterns, read back asynchronously. */
  async bits(): Promise<Uint16Array> {
    const words = (await this.packed.data()) as Int32Array;
    return new Uint16Array(Int32Array.from(words).buffer, 0, this.size);
  }

  /**
   * A float32 tensor of {@link shape} holding the values: transient, owned by the caller. On webgpu a
   * WGSL kernel (`unpack2x16float`); elsewhere decoded on the host (on wasm straight from its heap) and
   * uploaded.
   */
  unpack(): tf.Tensor {
    check(!this.isDisposed, 'disposed', 'float16 tensor was disposed');
    if (isWebGpuBackend()) return tf.tidy(() => tf.reshape(unpackOnDevice(this.packed, this.size), this.shape));
    return tf.tensor(this.valuesSync(), this.shape, 'float32');
  }

  /**
   * Rows `indices` of a 2-D float16 tensor [n, w] as a transient float32 tensor [S, w] (S =
   * indices.length), without unpacking the others. On webgpu one WGSL kernel reads just those rows'
   * words (value f = r·w + j in half f & 1 of word f / 2, any w); tfjs's own gather is not used there,
   * as it moves int32 values through float32 and would corrupt bit patterns above 2^24. On the host
   * backends with w even the packed form is an int32 matrix [n, w/2], gathered exactly and decoded from
   * one small readback; odd w there unpacks all and gathers. Same values as
   * `tf.gather(unpack(), indices)`. Does not dispose `indices`.
   * @throws KvpackError('shape') when the tensor is not 2-D or `indices` is not int32 1-D.
   */
  unpackRows(indices: tf.Tensor1D): tf.Tensor2D {
    check(!this.isDisposed, 'disposed', 'float16 tensor was disposed');
    check(this.shape.length === 2, 'shape', `unpackRows needs a 2-D float16 tensor, got shape [${this.shape}]`);
    check(indices.rank === 1 && indices.dtype === 'int32', 'shape', `unpackRows needs int32 row indices [S], got ${indices.dtype} [${indices.shape}]`);
    const [n, w] = this.shape;
    const S = indices.shape[0];
    if (S === 0 || w === 0 || n === 0) return tf.zeros([S, w]) as tf.Tensor2D;
    if (isWebGpuBackend()) return tf.tidy(() => tf.reshape(unpackRowsOnDevice(this.packed, indices, w), [S, w]) as tf.Tensor2D);
    if (w % 2 !== 0 || tf.getBackend() === 'webgl') return tf.tidy(() => tf.gather(this.unpack(), indices) as tf.Tensor2D);
    const words = tf.tidy(() => tf.gather(tf.reshape(this.packed, [n, w / 2]), indices));
    const bits = Int32Array.from(words.dataSync() as Int32Array);
    words.dispose();
    return tf.tensor2d(decodeHalf(new Uint16Array(bits.buffer, 0, S * w)), [S, w], 'float32');
  }

  /** Frees the packed tensor. Idempotent. */
  dispose(): void {
    if (!this.packed.isDisposed) this.packed.dispose();
  }
}

const FLAT = wgslFlatIndex('flat');

function unpackOnDevice(packed: tf.Tensor1D, n: number): tf.Tensor {
  if (n % 8 === 0) {
    // Eight values per invocation: one 16-byte load of four words, two 16-byte stores.
    return runFlatWgsl({
      key: 'unpack_half_x8',
      names: ['x'],
      inputs: [packed],
      outputShape: [n],
      dtype: 'float32',
      invocations: n / 8,
      components: { inputs: [4], output: 4 },
      code: `fn kernel(index: i32) {
  ${FLAT}
  if (flat >= uniforms.outShape / 8) { return; }
  let w = bitcast<vec4<u32>>(x[flat]);
  let a = unpack2x16float(w.x);
  let b = unpack2x16float(w.y);
  let c = unpack2x16float(w.z);
  let d = unpack2x16float(w.w);
  result[2 * flat] = vec4<f32>(a, b);
  result[2 * flat + 1] = vec4<f32>(c, d);
}`,
    });
  }
  return runFlatWgsl({
    key: 'unpack_half',
    names: ['x'],
    inputs: [packed],
    outputShape: [n],
    dtype: 'float32',
    invocations: n,
    code: `fn kernel(index: i32) {
  ${FLAT}
  if (flat >= uniforms.outShape) { return; }
  let pair = unpack2x16float(bitcast<u32>(x[flat / 2]));
  result[flat] = select(pair.x, pair.y, (flat & 1) == 1);
}`,
  });
}

/** Rows `rows` of a packed float16 matrix of width w, unpacked: float32 [S·w] (one kernel, only those rows read). */
function unpackRowsOnDevice(packed: tf.Tensor1D, rows: tf.Tensor1D, w: number): tf.Tensor {
  const n = rows.shape[0] * w;
  return runFlatWgsl({
    key: `unpack_half_rows_${w}`,
    names: ['x', 'rows'],
    inputs: [packed, rows],
    outputShape: [n],
    dtype: 'float32',
    invocations: n,
    code: `fn kernel(index: i32) {
  ${FLAT}
  if (flat >= uniforms.outShape) { return; }
  let s = flat / ${w};
  let f = u32(rows[s]) * ${w}u + u32(flat - s * ${w});
  let pair = unpack2x16float(bitcast<u32>(x[f >> 1u]));
  result[flat] = select(pair.x, pair.y, (f & 1u) == 1u);
}`,
  });
}

/**
 * WGSL `fn halfBits(v: f32) -> u32`: the float16 bit pattern of a float32 value, round half to even,
 * overflow to ±Inf, subnormals, NaN kept NaN — integer arithmetic on the float32 bits, the same
 * steps as the host's `toHalfBits`, so device and host packing agree bit for bit. For kernels that
 * write float16 results packed two per 32-bit word (`halfBits(lo) | (halfBits(hi) << 16)`).
 */
export const WGSL_HALF_BITS = `fn halfBits(v: f32) -> u32 {
  let x = bitcast<u32>(v);
  let sign = (x >> 16u) & 0x8000u;
  let ex = i32((x >> 23u) & 0xffu);
  var mant = x & 0x7fffffu;
  if (ex == 255) { return sign | 0x7c00u | select(0u, 0x200u, mant != 0u); }
  let e = ex - 112;
  if (e >= 31) { return sign | 0x7c00u; }
  if (e <= 0) {
    if (e < -10) { return sign; }
    mant = mant | 0x800000u;
    let shift = u32(14 - e);
    let half = 1u << (shift - 1u);
    let rest = mant & ((1u << shift) - 1u);
    var m = mant >> shift;
    if (rest > half || (rest == half && (m & 1u) == 1u)) { m = m + 1u; }
    return sign | m;
  }
  let rest = mant & 0x1fffu;
  var h = sign | (u32(e) << 10u) | (mant >> 13u);
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u) == 1u)) { h = h + 1u; }
  return h;
}`;

/**
 * One WGSL kernel that computes float32 values and writes them as float16 packed two per word
 * (rounded by {@link WGSL_HALF_BITS}, bit-identical to the host's encoding): `code` defines
 * `fn <value>(e: u32) -> f32`, the value of element e of the result, and reads the inputs `names`;
 * `size` is a WGSL u32 expression for the element count (from the inputs' uniform shapes, so the
 * shader serves every size). Word i holds elements 2i and 2i + 1 (0 past the end). Returns a
 * {@link HalfTensor} of `shape` (whose product is the element count). Disposes no input.
 * @throws as {@link runFlatWgsl} (KvpackError('unsupported') off the webgpu backend).
 */
export function runPackedHalfWgsl(k: { key: string; names: string[]; inputs: tf.Tensor[]; shape: number[]; code: string; value: string; size: string }): HalfTensor {
  const words = Math.ceil(k.shape.reduce((a, b) => a * b, 1) / 2);
  const packed = runFlatWgsl({
    key: k.key,
    names: k.names,
    inputs: k.inputs,
    outputShape: [words],
    dtype: 'int32',
    invocations: words,
    code: `${WGSL_HALF_BITS}
${k.code}
fn kernel(index: i32) {
  ${FLAT}
  if (flat >= uniforms.outShape) { return; }
  let size = ${k.size};
  let e = 2u * u32(flat);
  let lo = halfBits(${k.value}(e));
  let hi = select(0u, halfBits(${k.value}(min(e + 1u, size - 1u))), e + 1u < size);
  result[flat] = bitcast<i32>(lo | (hi << 16u));
}`,
  }) as tf.Tensor1D;
  return HalfTensor.fromPacked(packed, k.shape);
}

/** Rounds and packs in one kernel: word i holds values 2i (low half) and 2i + 1 (high half, 0 past the end). */
function packOnDevice(x: tf.Tensor): tf.Tensor1D {
  const n = x.size;
  const words = Math.ceil(n / 2);
  // One kernel: each value is converted to float16 bits by integer arithmetic on its float32 bits
  // (WGSL_HALF_BITS: round to nearest even, subnormals, overflow to ±Inf, NaN kept, as the host's
  // toHalfBits, so the result is bit-identical to the host encoding), then two are packed to a word.
  const flat = x.dtype === 'float32' ? tf.reshape(x, [n]) : tf.cast(tf.reshape(x, [n]), 'float32');
  try {
    if (n % 8 === 0)
      // Eight values per invocation: two 16-byte loads, one 16-byte store of four words.
      return runFlatWgsl({
        key: 'pack_half_rne_x8',
        names: ['x'],
        inputs: [flat],
        outputShape: [words],
        dtype: 'int32',
        invocations: words / 4,
        components: { inputs: [4], output: 4 },
        code: `${WGSL_HALF_BITS}
fn pair(a: f32, b: f32) -> u32 { return halfBits(a) | (halfBits(b) << 16u); }
fn kernel(index: i32) {
  ${FLAT}
  if (flat >= uniforms.outShape / 4) { return; }
  let u = x[2 * flat];
  let v = x[2 * flat + 1];
  result[flat] = bitcast<vec4<i32>>(vec4<u32>(pair(u.x, u.y), pair(u.z, u.w), pair(v.x, v.y), pair(v.z, v.w)));
}`,
      }) as tf.Tensor1D;
    return runFlatWgsl({
      key: 'pack_half_rne',
      names: ['x'],
      inputs: [flat],
      outputShape: [words],
      dtype: 'int32',
      invocations: words,
      code: `${WGSL_HALF_BITS}
fn kernel(index: i32) {
  ${FLAT}
  if (flat >= uniforms.outShape) { return; }
  let lo = halfBits(x[2 * flat]);
  let hi = select(0u, halfBits(x[min(2 * flat + 1, uniforms.xShape - 1)]), 2 * flat + 1 < uniforms.xShape);
  result[flat] = bitcast<i32>(lo | (hi << 16u));
}`,
    }) as tf.Tensor1D;
  } finally {
    flat.dispose();
  }
}

/** A float tensor held at its storage precision: float16 packed ({@link HalfTensor}) or a float32 tensor. */
export type HeldFloat = HalfTensor | tf.Tensor;

/**
 * Holds a float32 tensor at a storage dtype: float16 rounds and packs it (⌈n/2⌉·4 bytes resident),
 * float32 keeps a copy. Does not dispose `x`.
 */
export async function holdFloat(x: tf.Tensor, dtype: 'float16' | 'float32'): Promise<HeldFloat> {
  return dtype === 'float16' ? HalfTensor.fromTensor(x) : tf.clone(x);
}

/** The values of a held float as a transient float32 tensor (the caller disposes it). */
export function heldValues<T extends tf.Tensor = tf.Tensor>(h: HeldFloat): T {
  return (h instanceof HalfTensor ? h.unpack() : tf.clone(h)) as T;
}

/** Shape of a held float's values. */
export function heldShape(h: HeldFloat): number[] {
  return [...h.shape];
}

/**
 * The first `rows` rows (along axis 0) of a held float, held the same way: a new float16
 * {@link HalfTensor} from the same bit patterns (read back asynchronously, so on every backend), or a
 * float32 slice. The values are the stored ones, bit for bit. Does not dispose `h`.
 * @throws KvpackError('shape') when rows is not an integer in [0, shape[0]].
 */
export async function heldRowPrefix(h: HeldFloat, rows: number): Promise<HeldFloat> {
  const shape = heldShape(h);
  check(Number.isInteger(rows) && rows >= 0 && rows <= shape[0], 'shape', `row prefix: ${rows} rows is out of range [0, ${shape[0]}]`);
  const out = [rows, ...shape.slice(1)];
  if (!(h instanceof HalfTensor)) return tf.slice(h, 0, rows);
  const n = out.reduce((a, b) => a * b, 1);
  return HalfTensor.fromBits((await h.bits()).subarray(0, n), out);
}

/** Frees a held float. */
export function disposeHeld(h: HeldFloat | null | undefined): void {
  if (h && !h.isDisposed) h.dispose();
}
