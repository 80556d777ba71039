import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, check, isHostBackend, isWebGpuBackend, roundToHalfOnDevice } from '@kvpack/core';
import { CodesTensor } from './codes-tensor.js';
import { concatAllWords } from './words.js';
import { holdMinMaxWgsl } from './minmax-wgsl.js';

/**
 * Grouping of a min–max quantized [n, H, d] block (KIVI's two layouts):
 * - `tokens`: per channel, groups of g consecutive tokens (KIVI's keys); scale and min [n/g, H, d].
 * - `channels`: per token, groups of g consecutive channels of one head (KIVI's values); scale and
 *   min [n, H, d/g].
 */
export type MinMaxGrouping = 'tokens' | 'channels';

/** Shape of the per-group scale (and min) of an [n, H, d] block grouped along `along` by g. */
export function minMaxGroupShape(along: MinMaxGrouping, n: number, H: number, d: number, g: number): [number, number, number] {
  return along === 'tokens' ? [n / g, H, d] : [n, H, d / g];
}

/**
 * Dequantizes a min–max quantized [n, H, d] block held on the backend, x = code · scale + min, as a
 * transient float32 tensor [n, H, d] owned by the caller. Codes are unsigned b-bit (b ≤ 8) and
 * scale, min float16, so code · scale is exact in float32 and the sum is rounded once: the same
 * value as the host's `code * scale + min` stored to float32 (barring a double rounding, which
 * needs the exact sum to span more than 53 bits). Pure broadcasting (no gathers): the groups are
 * contiguous runs of g rows (`tokens`) or g elements (`channels`).
 * @throws KvpackError('shape') when the codes, scale or min do not fit [n, H, d] grouped by g.
 */
export function dequantizeMinMaxOnBackend(
  block: { along: MinMaxGrouping; n: number; H: number; d: number; g: number },
  codes: CodesTensor,
  scale: HalfTensor,
  min: HalfTensor,
): tf.Tensor3D {
  const { along, n, H, d, g } = block;
  const groupShape = minMaxGroupShape(along, n, H, d, g);
  const groups = groupShape[0] * groupShape[1] * groupShape[2];
  check(
    (along === 'tokens' ? n % g === 0 : d % g === 0) && codes.count === n * H * d && scale.size === groups && min.size === groups,
    'shape',
    `min–max block [${n}, ${H}, ${d}] grouped by ${g} ${along}: got ${codes.count} codes, ${scale.size} scales, ${min.size} minima`,
  );
  return tf.tidy(() => {
    // tokens: [n/g, g, H·d] codes against [n/g, 1, H·d] groups; channels: [n·H·d/g, g] against [n·H·d/g, 1].
    const codeShape = along === 'tokens' ? [n / g, g, H * d] : [groups, g];
    const perGroup = along === 'tokens' ? [n / g, 1, H * d] : [groups, 1];
    const u = tf.reshape(codes.unpack(), codeShape);
    const x = tf.add(tf.mul(u, tf.reshape(scale.unpack(), perGroup)), tf.reshape(min.unpack(), perGroup));
    return tf.reshape(x, [n, H, d]) as tf.Tensor3D;
  });
}

/**
 * The error of a floating-point sum, exactly (Knuth's TwoSum): with s = fl(a + b), returns e such that
 * a + b = s + e exactly. Six float32 ops, each correctly rounded on every backend (WGSL requires it of
 * +, −); as separate tfjs kernels they are never contracted or reassociated.
 */
function sumError(a: tf.Tensor, b: tf.Tensor, s: tf.Tensor): tf.Tensor {
  const bb = tf.sub(s, a);
  const aa = tf.sub(s, bb);
  return tf.add(tf.sub(a, aa), tf.sub(b, bb));
}

/**
 * A float32 value with the sign of D + e − P, exactly, where D + e is an exact value split by
 * {@link sumError} and P is a float32 value: when P is within a factor 2 of D, D − P is exact (Sterbenz)
 * and the rounded sum keeps the sign of the exact one; otherwise |D − P| ≥ |D|/2 far exceeds |e| and
 * decides the sign alone. Compare it with 0 (tfjs-wasm's `sign` maps small magnitudes to 0).
 */
function signOf(D: tf.Tensor, e: tf.Tensor, P: tf.Tensor): tf.Tensor {
  return tf.add(tf.sub(D, P), e);
}

/**
 * A min–max quantized [n, H, d] block computed on the backend ({@link quantizeMinMaxOnBackend}),
 * tensors owned by the caller.
 */
export interface MinMaxOnBackend {
  /** Unsigned codes, float32 [n·H·d] (integers in [0, 2^b − 1]), row-major as the block. */
  codes: tf.Tensor1D;
  /** Per-group scale, float32 holding float16 values, shape {@link minMaxGroupShape}. */
  scale: tf.Tensor3D;
  /** Per-group minimum, likewise. */
  min: tf.Tensor3D;
  /** 1 when a group's scale or minimum is beyond the float16 range (±65504) or NaN, else 0. */
  nonFinite: tf.Scalar;
}

/**
 * KIVI's asymmetric min–max quantization of a float32 [n, H, d] block, in tfjs ops on the current
 * backend (no host round trip): per group (see {@link MinMaxGrouping}), mn = f16(min),
 * scale = f16((max − min)/(2^b − 1)), code = clamp(round((x − mn)/scale), 0, 2^b − 1) rounded half to
 * even (torch.round), code 0 where scale = 0 (jy-yuan/KIVI, quant/new_pack.py, with the 16-bit scale
 * and minimum rounded before the codes are computed).
 *
 * Bit-identical to the host float64 quantizer, including its rounding of the scale through float32
 * (`toHalfBits` rounds a number to float32, then to float16): plain float32 ops would land on the
 * wrong side of a rounding boundary now and then (a float32 difference max − min or x − mn is
 * rounded; WebGPU's division may be off by 2.5 ulp). Here max − min and x − mn are carried as exact
 * two-term sums ({@link sumError}); the scale's quotient is a double-float division whose one
 * correctly rounded sum is the float32 the host rounds; each code is decided by the exact sign of
 * x − mn − (f + ½)·scale (f = ⌊t⌋ of the float32 quotient; (f + ½)·scale is an exact product). What can
 * still differ: a float64 host quotient is itself rounded, so the two may disagree where that
 * rounding lands exactly on a boundary (the exact value within 2^−44 relative of it); and backends
 * that flush float32 subnormals (some GPUs) for values below 2^−126.
 * @throws KvpackError('shape') when x is not [n, H, d] grouped by g.
 */
export function quantizeMinMaxOnBackend(block: { along: MinMaxGrouping; n: number; H: number; d: number; g: number; bits: 2 | 4 }, x: tf.Tensor): MinMaxOnBackend {
  const { along, n, H, d, g, bits } = block;
  check(
    x.size === n * H * d && (along === 'tokens' ? n % g === 0 : d % g === 0),
    'shape',
    `min–max quantization of [${n}, ${H}, ${d}] grouped by ${g} ${along}: got a tensor of shape [${x.shape}]`,
  );
  const maxq = 2 ** bits - 1;
  const groupShape = minMaxGroupShape(along, n, H, d, g);
  const groups = groupShape[0] * groupShape[1] * groupShape[2];
  return tf.tidy(() => {
    // tokens: [n/g, g, H·d] reduced over axis 1; channels: [groups, g] reduced over axis 1.
    const xs = tf.reshape(x, along === 'tokens' ? [n / g, g, H * d] : [groups, g]);
    const lo = tf.min(xs, 1, true);
    const hi = tf.max(xs, 1, true);
    const mn = roundToHalfOnDevice(lo);
    // scale = f16(f32((hi − lo)/maxq)), as the host rounds (through float32, see toHalfBits): the
    // quotient of the exact difference D + eD carried as a float32 pair rh + rl (a double-float
    // division), whose one correctly rounded sum is that float32.
    const negLo = tf.neg(lo);
    const D = tf.add(hi, negLo);
    const eD = sumError(hi, negLo, D);
    const rh = tf.div(D, maxq);
    // maxq·rh exactly, as Ph + Pl: 3·rh = 2·rh + rh, 15·rh = 16·rh − rh (one TwoSum each).
    const [a, b] = maxq === 3 ? [tf.mul(rh, 2), rh] : [tf.mul(rh, 16), tf.neg(rh)];
    const Ph = tf.add(a, b);
    const Pl = sumError(a, b, Ph);
    // D − Ph is exact (Sterbenz: Ph is within a few ulps of D); the rest is rounded far below rh's last bit.
    const rl = tf.div(tf.sub(tf.add(tf.sub(D, Ph), eD), Pl), maxq);
    const scale = roundToHalfOnDevice(tf.add(rh, rl));
    // codes: t = (x − mn)/scale rounded half to even, decided exactly. With f = ⌊t⌋ of the float32
    // quotient (clamped), the code is f + 1 when x − mn > (f + ½)·scale, f when below, and the even one
    // of the two at equality; (f + ½)·scale is an exact product and the comparison exact (signOf), so a
    // float32 t that lands on the wrong side of f + ½ (or of an integer) still gives the right code.
    // Comparisons and selects are costly tfjs-wasm kernels, so the step is arithmetic:
    // up = clamp(σ·2^150 + (f mod 2), 0, 1) with σ the signed difference (|σ| ≥ 2^−149 unless 0).
    const negMn = tf.neg(mn);
    const Dx = tf.add(xs, negMn);
    const ex = sumError(xs, negMn, Dx);
    const positive = tf.cast(tf.greater(scale, 0), 'float32');
    const safe = tf.add(scale, tf.sub(1, positive)); // 1 where the scale is 0 (codes 0 there)
    const f = tf.floor(tf.clipByValue(tf.div(Dx, safe), -1, maxq + 1));
    const sigma = signOf(Dx, ex, tf.mul(tf.add(f, 0.5), safe));
    const odd = tf.sub(f, tf.mul(tf.floor(tf.mul(f, 0.5)), 2));
    const up = tf.clipByValue(tf.add(tf.mul(tf.mul(sigma, 2 ** 75), 2 ** 75), odd), 0, 1);
    const code = tf.clipByValue(tf.add(f, up), 0, maxq);
    const codes = tf.reshape(tf.mul(code, positive), [n * H * d]) as tf.Tensor1D;
    const finite = (v: tf.Tensor) => tf.logicalAnd(tf.lessEqual(tf.abs(v), 65504), tf.equal(v, v));
    const nonFinite = tf.cast(tf.logicalNot(tf.all(tf.logicalAnd(finite(scale), finite(mn)))), 'float32') as tf.Scalar;
    return { codes, scale: tf.reshape(scale, groupShape) as tf.Tensor3D, min: tf.reshape(mn, groupShape) as tf.Tensor3D, nonFinite };
  });
}

/** A min–max quantized [n, H, d] block in its stored form on the backend (tensors owned by the caller). */
export interface HeldMinMax {
  /** Tokens n. */
  tokens: number;
  /** Packed codes [n, H, d]. */
  codes: CodesTensor;
  /** float16 scale and minimum per group, shape {@link minMaxGroupShape}. */
  scale: HalfTensor;
  min: HalfTensor;
}

/**
 * Elements quantized per chunk by {@link holdMinMaxOnBackend}: it bounds the transient tensors (about
 * 30 of the chunk's size live at once) to 4 MiB each on the host backends, 32 MiB on a GPU, where
 * fewer, larger dispatches pay off.
 */
const chunkElements = () => (isHostBackend() ? 2 ** 20 : 2 ** 23);

/**
 * {@link quantizeMinMaxOnBackend} of a float32 [n, H, d] block, chunked over tokens (whole groups,
 * whole packed words), packed into its stored form on the backend: codes by {@link CodesTensor.pack},
 * scale and minimum as float16 ({@link HalfTensor.fromTensorSync}). Synchronous; no host round trip on
 * webgpu (on the host backends, where tensors live in host memory, the float16 packing reads back).
 * `nonFinite` (a scalar the caller owns and may read later) is 1 when a group's scale or minimum is
 * beyond the float16 range. On webgpu the whole block is quantized and packed by a few fused WGSL
 * kernels (minmax-wgsl.ts: the same arithmetic, bit for bit), unchunked. Does not dispose `x`.
 * @throws KvpackError('shape') when x is not [n, H, d] grouped by g.
 */
export function holdMinMaxOnBackend(block: { along: MinMaxGrouping; n: number; H: number; d: number; g: number; bits: 2 | 4 }, x: tf.Tensor): HeldMinMax & { nonFinite: tf.Scalar } {
  const { along, n, H, d, g, bits } = block;
  check(
    x.size === n * H * d && n > 0 && (along === 'tokens' ? n % g === 0 : d % g === 0),
    'shape',
    `min–max quantization of [${n}, ${H}, ${d}] grouped by ${g} ${along}: got a tensor of shape [${x.shape}]`,
  );
  if (isWebGpuBackend() && x.dtype === 'float32') return holdMinMaxWgsl(block, x);
  // A chunk is whole key groups (a multiple of g tokens) and whole packed words (of 16 tokens: 16·b ≥ 32 bits a channel).
  const unit = (along === 'tokens' ? g : 1) * 16;
  const chunk = Math.max(1, Math.floor(chunkElements() / (H * d * unit))) * unit;
  const x3 = tf.reshape(x, [n, H, d]);
  const words: tf.Tensor[] = [];
  const scales: tf.Tensor[] = [];
  const mins: tf.Tensor[] = [];
  const flags: tf.Tensor[] = [];
  const made: { dispose(): void }[] = [];
  try {
    for (let t0 = 0; t0 < n; t0 += chunk) {
      const m = Math.min(chunk, n - t0);
      const part = m === n ? x3 : tf.slice(x3, [t0, 0, 0], [m, H, d]);
      const q = quantizeMinMaxOnBackend({ along, n: m, H, d, g, bits }, part);
      if (part !== x3) part.dispose();
      const packed = CodesTensor.pack(q.codes, bits);
      q.codes.dispose();
      words.push(packed.packed);
      scales.push(q.scale);
      mins.push(q.min);
      flags.push(q.nonFinite);
    }
    const join = (ts: tf.Tensor[]) => (ts.length === 1 ? tf.clone(ts[0]) : tf.concat(ts));
    const codes = CodesTensor.fromPacked(concatAllWords(words as tf.Tensor1D[]), bits, n * H * d);
    made.push(codes);
    const scaleF = join(scales);
    const scale = HalfTensor.fromTensorSync(scaleF);
    scaleF.dispose();
    made.push(scale);
    const minF = join(mins);
    const min = HalfTensor.fromTensorSync(minF);
    minF.dispose();
    made.push(min);
    const nonFinite = tf.tidy(() => tf.max(tf.stack(flags))) as tf.Scalar;
    return { tokens: n, codes, scale, min, nonFinite };
  } catch (e) {
    made.forEach((t) => t.dispose());
    throw e;
  } finally {
    if (x3 !== x) x3.dispose();
    tf.dispose([...words, ...scales, ...mins, ...flags]);
  }
}
