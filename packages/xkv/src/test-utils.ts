import { KvpackError, createStrategy, gaussian, mulberry32 } from '@kvpack/core';
import { expect } from 'vitest';
// Helpers for this package's tests (not exported from the package).
import * as tf from '@tensorflow/tfjs-core';
import { existsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Matrix, SingularValueDecomposition } from 'ml-matrix';
import type { KVCache, ModelLayout } from '@kvpack/core';

/** Directory of the shared models: $KVPACK_MODELS_DIR, else <repo>/../shared/models. */
export function modelsDir(): string {
  if (process.env.KVPACK_MODELS_DIR) return process.env.KVPACK_MODELS_DIR;
  const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
  return resolve(repoRoot, '..', 'shared', 'models');
}

export function hasFile(p: string): boolean {
  return existsSync(p);
}

/** Seeded uniform PRNG (core's mulberry32). */
export const rng = mulberry32;


/**
 * A synthetic prefill cache whose layers share a decaying token subspace (what xKV exploits):
 * X_l = Σ_j 0.8^j · a_j · (c_lj ⊗ w_lj) + noise, with token factors a_j shared by every layer.
 * Returns host copies (float32, [T, H_kv·d] row-major) too.
 */
export function syntheticCache(layout: ModelLayout, T: number, seed = 1, startPosition = 0): { cache: KVCache; keys: Float32Array[]; values: Float32Array[] } {
  const F = layout.nKvHeads * layout.headDim;
  const g = gaussian(seed);
  const J = 12;
  const make = (): Float32Array[] => {
    const A = Float64Array.from({ length: T * J }, g);
    return Array.from({ length: layout.nLayers }, () => {
      const W = Float64Array.from({ length: J * F }, g);
      const out = new Float32Array(T * F);
      for (let t = 0; t < T; t++)
        for (let f = 0; f < F; f++) {
          let s = 0.05 * g();
          for (let j = 0; j < J; j++) s += Math.pow(0.8, j) * A[t * J + j] * W[j * F + f];
          out[t * F + f] = s;
        }
      return out;
    });
  };
  const keys = make();
  const values = make();
  const shape: [number, number, number] = [T, layout.nKvHeads, layout.headDim];
  return {
    cache: {
      layout,
      rope: { theta: 10000, layout: 'interleaved' },
      keys: keys.map((k) => tf.tensor3d(k, shape)),
      values: values.map((v) => tf.tensor3d(v, shape)),
      startPosition,
    },
    keys,
    values,
  };
}


/** Side-by-side concatenation of row-major [T, F] matrices → [T, n·F]. */
export function hconcat(mats: Float32Array[], T: number, F: number): Float64Array {
  const n = mats.length;
  const out = new Float64Array(T * n * F);
  for (let t = 0; t < T; t++) for (let i = 0; i < n; i++) for (let f = 0; f < F; f++) out[t * n * F + i * F + f] = mats[i][t * F + f];
  return out;
}

/** Exact float64 truncated-SVD error ‖X − X_r‖_F / ‖X‖_F = sqrt(Σ_{i>r} σ_i² / Σ σ_i²) (ml-matrix SVD). */
export function exactSvdError(X: Float64Array, rows: number, cols: number, r: number): number {
  const m = Array.from({ length: rows }, (_, i) => Array.from(X.subarray(i * cols, (i + 1) * cols)));
  const sv = new SingularValueDecomposition(new Matrix(m), { computeLeftSingularVectors: false, computeRightSingularVectors: false, autoTranspose: true }).diagonal;
  const tot = sv.reduce((a, s) => a + s * s, 0);
  const tail = sv.slice(r).reduce((a, s) => a + s * s, 0);
  return Math.sqrt(tail / tot);
}

/** Singular values of a row-major [rows, cols] float64 matrix, descending (ml-matrix SVD, float64). */
export function singularValues(X: Float64Array, rows: number, cols: number): number[] {
  const m = Array.from({ length: rows }, (_, i) => Array.from(X.subarray(i * cols, (i + 1) * cols)));
  return new SingularValueDecomposition(new Matrix(m), { computeLeftSingularVectors: false, computeRightSingularVectors: false, autoTranspose: true }).diagonal;
}

/** Relative Frobenius error of a reconstruction of several layers taken together, in float64. */
export function groupError(orig: Float32Array[], approx: Float32Array[]): number {
  let num = 0;
  let den = 0;
  orig.forEach((o, i) => {
    const a = approx[i];
    for (let j = 0; j < o.length; j++) {
      num += (o[j] - a[j]) ** 2;
      den += o[j] ** 2;
    }
  });
  return Math.sqrt(num / den);
}

/** Paths of the stories260K model and its float64 oracle; `skip` says why tests are skipped. */
export function storiesPaths(): { dir: string; bin: string; oracle: string; have: boolean; skip: string } {
  // stories260K ships in the repository (models/); KVPACK_MODELS_DIR points elsewhere.
  const dir = process.env.KVPACK_MODELS_DIR ? resolve(modelsDir(), 'stories260K') : resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'models', 'stories260K');
  const bin = resolve(dir, 'stories260K_q80.bin');
  const oracle = resolve(dir, 'oracle.json');
  const have = existsSync(bin) && existsSync(oracle);
  return { dir, bin, oracle, have, skip: have ? '' : ` (SKIPPED: ${dir} not found; set KVPACK_MODELS_DIR)` };
}

/** max |a − b| / max |b| (relative max-abs difference of two arrays). */
export function relMax(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num = Math.max(num, Math.abs(a[i] - b[i]));
    den = Math.max(den, Math.abs(b[i]));
  }
  return num / den;
}

