import * as tf from '@tensorflow/tfjs-core';
import { check, gaussianMatrix, type FactoredShape, type KVCache, type ModelLayout } from '@kvpack/core';
import { strategyFactoredShapes, type ResolvedStrategy } from '../strategy.js';
import { resolvedSetting, type PerfSetting } from './settings.js';
import { timeOp } from './stats.js';
import type { MatmulFloor } from './suite-types.js';

// Matmul floors: the dense products a rank-r range finder cannot avoid, timed on the factored shapes.

/**
 * The factored matrices of a low-rank setting over `layers` layers, as its strategy declares them
 * (capability `factoredShapes`; e.g. xkv: per group of G layers, X = [T, n·H_kv·d] at ranks n·rankK
 * and n·rankV). Empty for strategies that factor nothing.
 */
export function factoredShapes(setting: PerfSetting & Partial<ResolvedStrategy>, layout: ModelLayout, layers: number): FactoredShape[] {
  return strategyFactoredShapes(resolvedSetting(setting), layout, layers);
}
/**
 * Sum of the matmul floors over the factored matrices: Σ count · (X·Ω + Qᵀ·X) medians.
 * @throws KvpackError('shape') when a floor is missing.
 */
export function floorMs(shapes: FactoredShape[], floors: MatmulFloor[], tokens: number): number {
  let ms = 0;
  for (const s of shapes) {
    const f = floors.find((x) => x.tokens === tokens && x.features === s.features && x.rank === s.rank);
    check(f, 'shape', `no matmul floor measured for [${tokens}, ${s.features}] rank ${s.rank}`);
    ms += s.count * (f.xOmega.medianMs + f.qtX.medianMs);
  }
  return ms;
}

/** Group matrix [T, n·F] of the first n layers' pre-RoPE keys (what xKV factors). */
export function groupMatrix(cache: KVCache, n: number): tf.Tensor2D {
  const T = cache.keys[0].shape[0];
  const F = cache.layout.nKvHeads * cache.layout.headDim;
  return tf.tidy(() => tf.concat(cache.keys.slice(0, n).map((k) => tf.reshape(k, [T, F])), 1) as tf.Tensor2D);
}

/**
 * Times the two dense products of a rank-r range finder on X [T, n·F] (the first n layers' keys side
 * by side): X·Ω with Ω [n·F, r] and Qᵀ·X with Qᵀ [r, T] stored transposed — plain products, the
 * fastest form on every backend.
 */
export async function measureMatmulFloor(cache: KVCache, layersInGroup: number, rank: number, opts: { reps: number; warmup: number; seed?: number }): Promise<MatmulFloor> {
  const X = groupMatrix(cache, layersInGroup);
  const [T, F] = X.shape;
  const omega = gaussianMatrix(F, rank, opts.seed ?? 1);
  const qt = gaussianMatrix(rank, T, (opts.seed ?? 1) + 1);
  try {
    const xOmega = await timeOp(() => tf.matMul(X, omega), opts);
    const qtX = await timeOp(() => tf.matMul(qt, X), opts);
    return { tokens: T, features: F, rank, xOmega, qtX };
  } finally {
    tf.dispose([X, omega, qt]);
  }
}
