import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, deviceCholesky, oversampleOf, isHostBackend, resolveOrthogonalization, truncatedSvdBatch, validateKVCache, type KVCache } from '@kvpack/core';
import { disposeBlock, makeBlock, type Block, type KindBlocks } from './factor-blocks.js';
import { KINDS, checkGroupRanks, layerGroups, rankOf, type GroupSvdConfig, type Kind } from './group-config.js';
import { GroupSvdCache } from './group-svd-cache.js';
import { resolveRanks } from './rank-target.js';
import { buildSparseIndex } from './sparse-index-build.js';
import { rangeFinderMatmul } from './tall-skinny-wgsl.js';
import type { SparseIndex } from './sparse-index.js';

/**
 * Compresses a prefill cache by grouped truncated SVD: per group of layers and per keys (pre-RoPE) /
 * values, X_g = [T, n·H_kv·d] (the group's layers' [T, H_kv·d] side by side) is factored by
 * `truncatedSvdBatch` from @kvpack/core (randomized, or exact) at rank r · n.
 *
 * Shapes: cache.keys[l], cache.values[l] are [T, H_kv, d]; the result stores U_g [T, R_g] per group and
 * B_l [R_g, H_kv·d] per layer, for keys and for values. Does not dispose `cache`.
 * @throws KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') for a bad cache (from validateKVCache);
 *         KvpackError('rank') when a group's rank is 0 or above min(T, features).
 * With a rank target (`targetRatio` / `rankFraction`) the group ranks are resolved for T first
 * (rank-target.ts) and recorded in the cache's config, stats and serialization.
 * `validatedTokens`: T when the caller (defineStrategy) has already validated the cache.
 */
export async function compressGroupSvd(cache: KVCache, strategy: string, options: unknown, configIn: GroupSvdConfig, validatedTokens?: number): Promise<GroupSvdCache> {
  const T = validatedTokens ?? (await validateKVCache(cache));
  const layout = cache.layout;
  const config = resolveRanks(strategy, configIn, layout, T);
  checkGroupRanks(strategy, config, layout, T);
  const F = layout.nKvHeads * layout.headDim;
  const groups = layerGroups(layout.nLayers, config.layersPerGroup);
  const blocks: Record<Kind, KindBlocks> = { k: { basis: [], factors: [] }, v: { basis: [], factors: [] } };
  const made: Block[] = [];
  try {
    for (const g of groups) {
      // X_g = [X_l₁ … X_l_G] as column blocks, never concatenated (core truncatedSvd takes blocks; the
      // per-layer factors come back as its coefficient blocks). On wasm/cpu each block is a fresh copy:
      // the wasm backend keeps a packed copy of a product's right operand until that tensor's data is
      // freed, which for the cache's own tensors would be never during compression.
      const jobs = KINDS.map((kind) => ({
        kind,
        R: rankOf(config, kind, g),
        basisName: `${kind}.basis.${g.index}`,
        factorNames: g.layers.map((l) => `${kind}.factor.${l}`),
      }));
      // On webgpu the keys and the values of a group are factored together when the WGSL Cholesky
      // factors their Gram matrices (one batch of dispatches for both, whatever their ranks), at the
      // cost of both sketches (and both concatenated group matrices) alive at once; elsewhere one at a
      // time, where batching would only raise the peak memory.
      const widths = jobs.map((j) => j.R + oversampleOf(j.R, config.oversample));
      const together = !config.exact && resolveOrthogonalization(config.orthogonalization) === 'device' && widths.every((k) => deviceCholesky(k));
      for (const batch of together ? [jobs] : jobs.map((j) => [j])) {
        const outs = await factorGroupBlocks(
          batch.map((j) => ({ ...j, X: g.layers.map((l) => groupColumnBlock((j.kind === 'k' ? cache.keys : cache.values)[l], T, F)) })),
          config,
        );
        for (const [i, out] of outs.entries()) {
          const kind = batch[i].kind;
          blocks[kind].basis[g.index] = out.basis;
          made.push(out.basis);
          g.layers.forEach((l, li) => {
            blocks[kind].factors[l] = out.factors[li];
            made.push(out.factors[li]);
          });
        }
      }
    }
  } catch (e) {
    for (const b of made) disposeBlock(b);
    if (e instanceof KvpackError) throw e;
    throw new KvpackError('unsupported', `${strategy}: compression failed: ${(e as Error).message}`, { cause: e });
  }
  let sparse: SparseIndex | null = null;
  if (config.decode === 'sparse') {
    try {
      sparse = await buildSparseIndex(cache, T, config.sparse!);
    } catch (e) {
      for (const b of made) disposeBlock(b);
      throw e;
    }
  }
  return new GroupSvdCache(strategy, options, config, layout, cache.rope, T, cache.startPosition ?? 0, blocks, sparse);
}

/**
 * One column block of a group matrix: `x` viewed as [T, F]. On wasm/cpu a fresh copy: the wasm
 * backend keeps a packed copy of a product's right operand until that tensor's data is freed, which
 * for the cache's own tensors would be never during compression.
 */
export function groupColumnBlock(x: tf.Tensor, T: number, F: number): tf.Tensor2D {
  return tf.tidy(() => (isHostBackend() ? tf.add(tf.reshape(x, [T, F]), 0) : tf.reshape(x, [T, F])) as tf.Tensor2D);
}

/** One group matrix for {@link factorGroupBlocks}: its column blocks, rank and stored names. */
export interface GroupFactorJob {
  /** Column blocks X_i [T, F_i] of X_g (taken over: disposed). */
  X: tf.Tensor2D[];
  R: number;
  basisName: string;
  factorNames: string[];
}

/**
 * Factors group matrices X_g = [X_1 … X_n] (column blocks [T, F_i], never concatenated) by core's
 * `truncatedSvdBatch` at their ranks R (the jobs share each orthonormalization's dispatches on
 * webgpu), splits Σ evenly between the token basis and the factors (U·√Σ, √Σ·Vᵀ, by the factor rows'
 * norms over all blocks, as the xKV authors' `fake_svd` does) on the backend, and stores them as
 * configured (`makeBlock`): the basis [T, R] as `basisName`, factor i [R, F_i] as `factorNames[i]`.
 * Takes ownership of every job's `X` (disposed); leaks nothing when it throws.
 * @throws as core's truncatedSvd.
 */
export async function factorGroupBlocks(jobs: GroupFactorJob[], config: GroupSvdConfig): Promise<{ basis: Block; factors: Block[] }[]> {
  const live: tf.Tensor[] = jobs.flatMap((j) => j.X);
  const made: Block[] = [];
  try {
    const svds = await truncatedSvdBatch(
      jobs.map((j) => ({ blocks: j.X, rank: j.R })),
      {
        oversample: config.oversample,
        powerIters: config.powerIters,
        seed: config.seed,
        sketch: config.sketch,
        exact: config.exact,
        orthogonalization: config.orthogonalization,
        // On webgpu the products (X·Ω, Yᵀ·X, X·P, Qᵀ·X and the k×k work) run as a tiled WGSL GEMM.
        matmul: rangeFinderMatmul(),
      },
    );
    for (const svd of svds) live.push(svd.basis, ...svd.coeffs);
    for (const j of jobs) tf.dispose(j.X);
    const outs: { basis: Block; factors: Block[] }[] = [];
    for (const [ji, svd] of svds.entries()) {
      // No host round-trip between the SVD and the stored factors.
      const R = jobs[ji].R;
      const [basis, ...factors] = tf.tidy(() => {
        const norms = tf.sqrt(tf.addN(svd.coeffs.map((c) => tf.sum(tf.square(c), 1))));
        const s = tf.where(tf.logicalAnd(tf.greater(norms, 0), tf.isFinite(norms)), tf.sqrt(norms), tf.onesLike(norms));
        const sr = tf.reshape(s, [R, 1]);
        return [tf.mul(svd.basis, tf.reshape(s, [1, R])) as tf.Tensor2D, ...svd.coeffs.map((c) => tf.div(c, sr) as tf.Tensor2D)];
      });
      tf.dispose([svd.basis, ...svd.coeffs]);
      live.push(basis, ...factors);
      const bb = await makeBlock(jobs[ji].basisName, basis, config, 'basis');
      made.push(bb);
      const fbs: Block[] = [];
      for (let i = 0; i < factors.length; i++) {
        const fb = await makeBlock(jobs[ji].factorNames[i], factors[i], config, 'factors');
        made.push(fb);
        fbs.push(fb);
      }
      outs.push({ basis: bb, factors: fbs });
    }
    return outs;
  } catch (e) {
    for (const t of live) if (!t.isDisposed) t.dispose();
    for (const b of made) disposeBlock(b);
    throw e;
  }
}
