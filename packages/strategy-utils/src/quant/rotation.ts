import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, check, gaussian, mulberry32 } from '@kvpack/core';
import { CodesTensor } from './codes-tensor.js';

/*
 * Rotation quantization after TurboQuant (Zandieh et al. 2025, arXiv 2504.19874) and QJL (Zandieh et
 * al. 2024, arXiv 2406.03482): a vector x ∈ R^d is stored as its norm ‖x‖, the b-bit codes of the
 * coordinates of the rotated unit vector Π·x/‖x‖ under a scalar Lloyd–Max codebook, and, for keys,
 * the 1-bit sign sketch sign(S·r) of the residual r = x − x̂ with its norm ‖r‖, from which
 * ⟨q, x̂⟩ + ‖r‖·√(π/2)/m·⟨S·q, sign(S·r)⟩ estimates ⟨q, x⟩ without bias.
 */

/** Bits of a rotation-quantizer codebook: 2^b levels per coordinate. */
export type CodebookBits = 1 | 2 | 4;

/**
 * The random sign flips D of the randomized Hadamard rotation Π = H·D/√d of one seed: d values ±1
 * (core's mulberry32 stream, < 0.5 → −1).
 */
export function hadamardSigns(seed: number, d: number): Float32Array {
  const u = mulberry32(seed);
  return Float32Array.from({ length: d }, () => (u() < 0.5 ? -1 : 1));
}

/**
 * The QJL projection S of one seed: m × d float64 entries i.i.d. N(0, 1) (core's gaussian stream),
 * row-major. Derived from the seed, not stored.
 */
export function qjlMatrix(seed: number, m: number, d: number): Float64Array {
  const g = gaussian(seed);
  return Float64Array.from({ length: m * d }, () => g());
}

/**
 * The unnormalized fast Walsh–Hadamard transform of each row of x [N, d] on the backend (d a power
 * of two): log2(d) butterfly stages (a, b) → (a + b, a − b) on the pairs i, i + h, so row·H_d with
 * H_d[i][j] = (−1)^popcount(i & j) (Sylvester's order). Transient, owned by the caller.
 * @throws KvpackError('shape') when d is not a power of two.
 */
export function fwht(x: tf.Tensor2D): tf.Tensor2D {
  const [N, d] = x.shape;
  check(d >= 1 && (d & (d - 1)) === 0, 'shape', `Walsh–Hadamard transform: head_dim ${d} is not a power of two`);
  return tf.tidy(() => {
    let y: tf.Tensor = x;
    for (let h = 1; h < d; h *= 2) {
      const r = tf.reshape(y, [N, d / (2 * h), 2, h]);
      const [a, b] = tf.unstack(r, 2);
      y = tf.stack([tf.add(a, b), tf.sub(a, b)], 2);
    }
    return tf.reshape(y, [N, d]) as tf.Tensor2D;
  });
}

/** Π·x for each row: H·(D ⊙ x)/√d. [N, d] → [N, d], transient. */
export function hadamardRotate(x: tf.Tensor2D, signs: Float32Array): tf.Tensor2D {
  const d = x.shape[1];
  return tf.tidy(() => tf.mul(fwht(tf.mul(x, tf.tensor1d(signs))), 1 / Math.sqrt(d)) as tf.Tensor2D);
}

/** Πᵀ·y for each row: D ⊙ (H·y)/√d (H symmetric, D² = I). [N, d] → [N, d], transient. */
export function hadamardUnrotate(y: tf.Tensor2D, signs: Float32Array): tf.Tensor2D {
  const d = y.shape[1];
  return tf.tidy(() => tf.mul(fwht(y), tf.mul(tf.tensor1d(signs), 1 / Math.sqrt(d))) as tf.Tensor2D);
}

/** A scalar codebook: 2^b centroids ascending and the 2^b − 1 decision thresholds between them (midpoints). */
export interface ScalarCodebook {
  centroids: Float64Array;
  thresholds: Float64Array;
}

const codebooks = new Map<string, ScalarCodebook>();

/**
 * The Lloyd–Max codebook of b bits for one coordinate of a uniformly random unit vector of R^d (the
 * distribution of each coordinate after a random rotation, TurboQuant §3.1): density ∝ (1 − y²)^((d−3)/2)
 * on [−1, 1], i.e. y = cos θ with θ ∝ sin^(d−2) θ on [0, π]. The density is even, so the codebook
 * is symmetric (middle threshold 0): Lloyd's iterations (thresholds at the midpoints, centroids at the
 * conditional means, from interpolated cumulative integrals over 2^16 steps of θ) on y ≥ 0 until no
 * centroid moves by 1e-15. Float64; cached per (d, b).
 * @throws KvpackError('shape') when d < 2.
 */
export function lloydMaxCodebook(d: number, bits: CodebookBits): ScalarCodebook {
  check(Number.isInteger(d) && d >= 2, 'shape', `Lloyd–Max codebook: head_dim ${d} must be at least 2`);
  const key = `${d}|${bits}`;
  const hit = codebooks.get(key);
  if (hit) return hit;
  // The density is even, so the codebook is symmetric: Lloyd's iterations run on y ≥ 0 with 2^(b−1)
  // levels (the middle threshold is 0). Cell masses and first moments come from cumulative trapezoid
  // sums over θ ∈ [0, π/2] (y = cos θ, weight sin^(d−2) θ) on 2^16 steps, read at any threshold by
  // linear interpolation, so each iteration costs O(2^b).
  const M = 1 << 16;
  const cw = new Float64Array(M + 1); // ∫ weight from y = 0 up to y_i (θ_i = π/2·(1 − i/M))
  const cwy = new Float64Array(M + 1);
  const h = Math.PI / 2 / M;
  const w = (th: number) => (d === 2 ? 1 : Math.pow(Math.sin(th), d - 2));
  for (let i = 1; i <= M; i++) {
    const a0 = (Math.PI / 2) * (1 - (i - 1) / M);
    const a1 = (Math.PI / 2) * (1 - i / M);
    cw[i] = cw[i - 1] + (h * (w(a0) + w(a1))) / 2;
    cwy[i] = cwy[i - 1] + (h * (w(a0) * Math.cos(a0) + w(a1) * Math.cos(a1))) / 2;
  }
  const at = (arr: Float64Array, y: number) => {
    const x = Math.min(M, Math.max(0, (1 - Math.acos(Math.min(1, Math.max(0, y))) / (Math.PI / 2)) * M));
    const i = Math.min(M - 1, Math.floor(x));
    return arr[i] + (x - i) * (arr[i + 1] - arr[i]);
  };
  const Lh = 2 ** (bits - 1);
  const c = new Float64Array(Lh);
  const t = new Float64Array(Lh - 1);
  // Start at evenly spread levels, then Lloyd: thresholds at the midpoints, centroids at the cells' means.
  for (let j = 0; j < Lh; j++) c[j] = (j + 0.5) / Lh / Math.sqrt(d);
  for (let it = 0; it < 1_000_000; it++) {
    for (let k = 0; k < Lh - 1; k++) t[k] = (c[k] + c[k + 1]) / 2;
    let moved = 0;
    for (let j = 0; j < Lh; j++) {
      const lo = j === 0 ? 0 : t[j - 1];
      const hi = j === Lh - 1 ? 1 : t[j];
      const mass = at(cw, hi) - at(cw, lo);
      const next = mass > 0 ? (at(cwy, hi) - at(cwy, lo)) / mass : c[j];
      moved = Math.max(moved, Math.abs(next - c[j]));
      c[j] = next;
    }
    if (moved < 1e-15) break;
  }
  for (let k = 0; k < Lh - 1; k++) t[k] = (c[k] + c[k + 1]) / 2;
  const centroids = Float64Array.from([...Array.from(c).reverse().map((x) => -x), ...c]);
  const thresholds = Float64Array.from([...Array.from(t).reverse().map((x) => -x), 0, ...t]);
  const out = { centroids, thresholds };
  codebooks.set(key, out);
  return out;
}

/** One set of rotation-quantized rows as held on the backend. */
export interface RotationCodes {
  /** Rows N and head_dim d. */
  rows: number;
  dim: number;
  bits: CodebookBits;
  /** Codebook indices of the rotated unit rows, N·d codes of `bits` bits, row-major. */
  codes: CodesTensor;
  /** ‖x‖ per row, float16 [N]. */
  norms: HalfTensor;
  /** QJL sketch sign(S·r) ≥ 0 as bits (1 = +1), N·m codes, row-major; keys only. */
  signs?: CodesTensor;
  /** ‖r‖ per row, float16 [N]; keys only. */
  residualNorms?: HalfTensor;
}

/** What a rotation quantizer needs besides the rows: the rotation's sign flips, the codebook and, for the QJL sketch, S (m × d). */
export interface RotationSetup {
  signs: Float32Array;
  codebook: ScalarCodebook;
  bits: CodebookBits;
  /** QJL projection, m × d row-major; absent: no sketch. */
  qjl?: { S: Float64Array; m: number };
}

/**
 * Quantizes rows x [N, d] (float32, not disposed) on the backend: n = ‖x‖ (rounded to float16, as
 * stored), y = Π·x/‖x‖ (zero rows stay zero), code_j = #{thresholds < y_j} (a value equal to a
 * threshold takes the lower cell), then with QJL the residual r = x − x̂ against the reconstruction
 * x̂ = n·Πᵀ·c[code] that reads will produce, its float16 norm and the bits sign(S·r) ≥ 0. Every part
 * is packed on the backend (codes, bits, float16 norms).
 */
export async function rotationQuantize(x: tf.Tensor2D, setup: RotationSetup): Promise<RotationCodes> {
  const [N, d] = x.shape;
  const { signs, codebook, bits, qjl } = setup;
  const made: { codes?: CodesTensor; norms?: HalfTensor; signs?: CodesTensor; residualNorms?: HalfTensor } = {};
  try {
    const norm = tf.tidy(() => tf.sqrt(tf.sum(tf.square(x), 1)));
    try {
      made.norms = await HalfTensor.fromTensor(norm);
    } finally {
      norm.dispose();
    }
    const codes = tf.tidy(() => {
      const n = tf.sqrt(tf.sum(tf.square(x), 1, true));
      const u = tf.div(x, tf.maximum(n, 1e-30));
      const y = hadamardRotate(u as tf.Tensor2D, signs);
      const t = tf.tensor1d(Float32Array.from(codebook.thresholds));
      return tf.sum(tf.cast(tf.greater(tf.reshape(y, [N, d, 1]), tf.reshape(t, [1, 1, -1])), 'float32'), 2);
    });
    try {
      made.codes = CodesTensor.pack(codes, bits);
    } finally {
      codes.dispose();
    }
    if (qjl) {
      const r = tf.tidy(() => tf.sub(x, rotationReconstruct({ rows: N, dim: d, bits, codes: made.codes!, norms: made.norms! }, setup, false)));
      try {
        const rn = tf.tidy(() => tf.sqrt(tf.sum(tf.square(r), 1)));
        try {
          made.residualNorms = await HalfTensor.fromTensor(rn);
        } finally {
          rn.dispose();
        }
        const bitsT = tf.tidy(() => tf.cast(tf.greaterEqual(tf.matMul(r, qjlTensorT(qjl)), 0), 'float32')); // [N, m]
        try {
          made.signs = CodesTensor.pack(bitsT, 1);
        } finally {
          bitsT.dispose();
        }
      } finally {
        r.dispose();
      }
    }
    return { rows: N, dim: d, bits, codes: made.codes!, norms: made.norms!, ...(made.signs ? { signs: made.signs, residualNorms: made.residualNorms! } : {}) };
  } catch (e) {
    made.codes?.dispose();
    made.norms?.dispose();
    made.signs?.dispose();
    made.residualNorms?.dispose();
    throw e;
  }
}

/** Sᵀ as a float32 tensor [d, m] (transient). */
function qjlTensorT(qjl: { S: Float64Array; m: number }): tf.Tensor2D {
  const d = qjl.S.length / qjl.m;
  const t = new Float32Array(d * qjl.m);
  for (let i = 0; i < qjl.m; i++) for (let j = 0; j < d; j++) t[j * qjl.m + i] = qjl.S[i * d + j];
  return tf.tensor2d(t, [d, qjl.m]);
}

/** The sign sketch as ±1, [N, m] float32 (transient). */
export function qjlSigns(q: RotationCodes, m: number): tf.Tensor2D {
  return tf.tidy(() => tf.sub(tf.mul(tf.reshape(q.signs!.unpack(), [q.rows, m]), 2), 1) as tf.Tensor2D);
}

/**
 * The reconstruction of quantized rows [N, d] on the backend: x̂ = n·Πᵀ·c[code]; with `withQjl` and a
 * sketch, plus the QJL dequantization ‖r‖·√(π/2)/m·Sᵀ·z (z = ±1 signs), whose inner product with any
 * q is the unbiased estimate of ⟨q, r⟩ (QJL Lemma 3.2; TurboQuant Algorithm 2). Transient.
 */
export function rotationReconstruct(q: RotationCodes, setup: RotationSetup, withQjl = true): tf.Tensor2D {
  const { rows: N, dim: d } = q;
  return tf.tidy(() => {
    const table = tf.tensor1d(Float32Array.from(setup.codebook.centroids));
    const y = tf.reshape(tf.gather(table, tf.cast(q.codes.unpack(), 'int32')), [N, d]) as tf.Tensor2D;
    let x = tf.mul(hadamardUnrotate(y, setup.signs), tf.reshape(q.norms.unpack(), [N, 1]));
    if (withQjl && q.signs && setup.qjl) {
      const { m } = setup.qjl;
      const S = tf.transpose(qjlTensorT(setup.qjl)); // [m, d]
      const coef = tf.mul(tf.reshape(q.residualNorms!.unpack(), [N, 1]), Math.sqrt(Math.PI / 2) / m);
      x = tf.add(x, tf.mul(tf.matMul(qjlSigns(q, m), S), coef));
    }
    return x as tf.Tensor2D;
  });
}

/**
 * The attention logits' inner products ⟨q_i, k_j⟩ estimated from quantized keys on the backend:
 * ⟨q_i, x̂_j⟩ + ‖r_j‖·√(π/2)/m·⟨S·q_i, z_j⟩ (the QJL estimator, unbiased over S), for queries
 * [n, d] against keys [N, d]: [n, N]. Without a sketch, ⟨q_i, x̂_j⟩. Transient.
 */
export function rotationInnerProducts(queries: tf.Tensor2D, q: RotationCodes, setup: RotationSetup): tf.Tensor2D {
  const { rows: N } = q;
  return tf.tidy((): tf.Tensor2D => {
    const base = tf.matMul(queries, rotationReconstruct(q, setup, false), false, true); // [n, N]
    if (!q.signs || !setup.qjl) return base as tf.Tensor2D;
    const { m } = setup.qjl;
    const sq = tf.matMul(queries, qjlTensorT(setup.qjl)); // S·q_i as rows [n, m]
    const dots = tf.matMul(sq, qjlSigns(q, m), false, true); // [n, N]
    return tf.add(base, tf.mul(dots, tf.mul(tf.reshape(q.residualNorms!.unpack(), [1, N]), Math.sqrt(Math.PI / 2) / m))) as tf.Tensor2D;
  });
}

/** Disposes the tensors of quantized rows. */
export function disposeRotationCodes(q: RotationCodes): void {
  q.codes.dispose();
  q.norms.dispose();
  q.signs?.dispose();
  q.residualNorms?.dispose();
}
