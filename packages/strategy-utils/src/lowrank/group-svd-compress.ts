import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, isHostBackend, truncatedSvd, validateKVCache, type KVCache } from '@kvpack/core';
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
 * `truncatedSvd` from @kvpack/core (randomized, or exact) at rank r · n.
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
  const live: tf.Tensor[] = [];
  const made: Block[] = [];
  try {
    for (const g of groups) {
      for (const kind of KINDS) {
        const src = kind === 'k' ? cache.keys : cache.values;
        // X_g = [X_l₁ … X_l_G] as column blocks, never concatenated (core truncatedSvd takes blocks; the
        // per-layer factors come back as its coefficient blocks). On wasm/cpu each block is a fresh copy:
        // the wasm backend keeps a packed copy of a product's right operand until that tensor's data is
        // freed, which for the cache's own tensors would be never during compression.
        const X = g.layers.map((l) => tf.tidy(() => (isHostBackend() ? tf.add(tf.reshape(src[l], [T, F]), 0) : tf.reshape(src[l], [T, F])) as tf.Tensor2D));
        live.push(...X);
        const R = rankOf(config, kind, g);
        const svd = await truncatedSvd(X, {
          rank: R,
          oversample: config.oversample,
          powerIters: config.powerIters,
          seed: config.seed,
          exact: config.exact,
          orthogonalization: config.orthogonalization,
          // On webgpu the products (X·Ω, Yᵀ·X, X·P, Qᵀ·X and the k×k work) run as a tiled WGSL GEMM.
          matmul: rangeFinderMatmul(),
        });
        live.push(svd.basis, ...svd.coeffs);
        tf.dispose(X);
        // Split Σ evenly between the basis and the factors (U·√Σ, √Σ·Vᵀ) by the factor rows' norms
        // (over all the group's layers), on the backend: no host round-trip between the SVD and the
        // stored factors.
        const [basis, ...factors] = tf.tidy(() => {
          const norms = tf.sqrt(tf.addN(svd.coeffs.map((c) => tf.sum(tf.square(c), 1))));
          const s = tf.where(tf.logicalAnd(tf.greater(norms, 0), tf.isFinite(norms)), tf.sqrt(norms), tf.onesLike(norms));
          const sr = tf.reshape(s, [R, 1]);
          return [tf.mul(svd.basis, tf.reshape(s, [1, R])) as tf.Tensor2D, ...svd.coeffs.map((c) => tf.div(c, sr) as tf.Tensor2D)];
        });
        tf.dispose([svd.basis, ...svd.coeffs]);
        live.push(basis, ...factors);
        const bb = await makeBlock(`${kind}.basis.${g.index}`, basis, config, 'basis');
        blocks[kind].basis[g.index] = bb;
        made.push(bb);
        for (let i = 0; i < g.layers.length; i++) {
          const fb = await makeBlock(`${kind}.factor.${g.layers[i]}`, factors[i], config, 'factors');
          blocks[kind].factors[g.layers[i]] = fb;
          made.push(fb);
        }
      }
    }
  } catch (e) {
    for (const t of live) if (!t.isDisposed) t.dispose();
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
