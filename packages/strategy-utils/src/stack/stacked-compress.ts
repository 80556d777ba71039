import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, applyRope, check, compressionRatioOf, denseCacheBytes, type KVCache, type ModelLayout, type TokenSelector } from '@kvpack/core';
import { positionLayerBytes } from './positions.js';
import { layerGroups, type GroupSvdConfig } from '../lowrank/group-config.js';
import { compressGroupSvd } from '../lowrank/group-svd-compress.js';
import { lowRankBytes, targetGroupRanks, type GroupRanks } from '../lowrank/rank-target.js';
import { StackedCache } from './stacked-cache.js';

/** The stages of a composed compression, resolved by the strategy that composes them. */
export interface StackedStages {
  /** Registered name of the composed strategy (errors, serialization). */
  strategy: string;
  /** The composed strategy's options, recorded in the serialization. */
  options: unknown;
  /** Token selection of the eviction stage (a registered eviction strategy's `tokenSelector`), or null to keep every token. */
  selector: TokenSelector | null;
  /** Name of the eviction stage for stats (`snapkv`), or `none`. */
  evictLabel: string;
  /** Low-rank settings over the kept tokens, the quantization stage included (`factorQuantization`). */
  lowRank: GroupSvdConfig;
  /**
   * Overall target ratio ρ (dense fp16 bytes of the T prefill tokens ÷ bytes held): the low-rank
   * ranks are resolved from it ({@link stackedGroupRanks}); the low-rank config must then give no
   * rank target of its own.
   */
  targetRatio?: number;
}

/** Bytes of the stored kept positions of n of T tokens (positions.ts: a mask or a list per KV head and layer), 0 when implied. */
export function keptPositionBytes(layout: ModelLayout, T: number, n: number, stored: boolean): number {
  return stored ? layout.nLayers * positionLayerBytes(layout.nKvHeads, T, n) : 0;
}

/**
 * The group ranks that meet an overall target ratio ρ for a composition that keeps n of T tokens:
 * the low-rank stage gets the byte budget dense(T) / ρ − position bytes, i.e. its own target ratio
 * ρ' = dense(n) / that budget, resolved by `targetGroupRanks` (largest ranks in the rankK : rankV
 * proportion whose bytes fit, ranks rounded down), so the measured ratio right after compress is ≥ ρ.
 * @throws KvpackError('config') when rank 1 in every group already exceeds the budget, naming the
 *   reachable range at this n.
 */
export function stackedGroupRanks(strategy: string, config: GroupSvdConfig, layout: ModelLayout, T: number, n: number, storedPositions: boolean, rho: number): GroupRanks {
  const dense = denseCacheBytes(layout, T);
  const pos = keptPositionBytes(layout, T, n, storedPositions);
  const groups = layerGroups(layout.nLayers, config.layersPerGroup);
  const ones = { k: groups.map(() => 1), v: groups.map(() => 1) };
  const best = dense / (lowRankBytes(config, layout, n, ones) + pos);
  const budget = dense / rho - pos;
  const outOfReach = () =>
    new KvpackError(
      'config',
      `${strategy}: targetRatio ${rho} (compressionRatio ${compressionRatioOf(rho).toFixed(4)}) is out of reach at T=${T}: ` +
        `keeping ${n} tokens per KV head, rank 1 in every group gives ${best.toFixed(3)}×; reachable: up to ${best.toFixed(3)}× (evict more, or quantize the factors)`,
    );
  if (budget <= 0 || best < rho) throw outOfReach();
  try {
    return targetGroupRanks(strategy, { ...config, rankFraction: undefined, groupRanks: undefined, targetRatio: denseCacheBytes(layout, n) / budget }, layout, n);
  } catch (e) {
    if (e instanceof KvpackError && e.code === 'rank') throw outOfReach();
    throw e;
  }
}

/** [n, H] positions of every head: `one` [n] repeated. */
function perHead(one: Int32Array, H: number): Int32Array {
  const out = new Int32Array(one.length * H);
  for (let j = 0; j < one.length; j++) out.fill(one[j], j * H, (j + 1) * H);
  return out;
}

/** Rows of x [T, H, d] per KV head: out[j, h] = x[positions[j·H + h], h], [n, H, d] float32 (new tensor). */
function gatherKept(x: tf.Tensor3D, positions: Int32Array): tf.Tensor3D {
  const [T, H, d] = x.shape;
  const n = positions.length / H;
  return tf.tidy(() => {
    const rows = tf.tensor1d(Int32Array.from(positions, (p, i) => p * H + (i % H)), 'int32');
    return tf.reshape(tf.gather(tf.reshape(x, [T * H, d]), rows), [n, H, d]) as tf.Tensor3D;
  });
}

/**
 * Compresses a prefill cache through the stages: (1) the selector keeps n tokens per KV head and layer
 * (scored on post-RoPE keys rotated at startPosition + i); (2) the kept tokens' pre-RoPE keys and
 * values [n, H_kv, d] are factored by grouped truncated SVD (xKV over the kept tokens,
 * `compressGroupSvd`); (3) the factors are stored float16 or group-quantized (int8/int4, bit-packed)
 * as `lowRank.factorQuantization` says. With an overall targetRatio the ranks come from
 * {@link stackedGroupRanks}. Does not dispose `cache`; a failed compress leaks no tensor.
 * @throws KvpackError('config') for an unreachable target or a selector that cannot run on this cache;
 *   KvpackError('rank') for ranks above min(n, features).
 */
export async function compressStacked(cache: KVCache, stages: StackedStages, T: number): Promise<StackedCache> {
  const { layout } = cache;
  const { nLayers: L, nKvHeads: H } = layout;
  const sel = stages.selector;
  sel?.check?.(cache);
  const n = sel ? sel.kept(layout, T) : T;
  check(Number.isInteger(n) && n >= 1 && n <= T, 'config', `${stages.strategy}: the eviction stage keeps ${n} tokens of ${T}`);
  const stored = !!sel && !sel.impliedPositions;
  let config = stages.lowRank;
  if (stages.targetRatio !== undefined) {
    check(config.targetRatio === undefined && config.rankFraction === undefined, 'config', `${stages.strategy}: give the overall targetRatio or a low-rank targetRatio/rankFraction, not both`);
    config = { ...config, groupRanks: stackedGroupRanks(stages.strategy, config, layout, T, n, stored, stages.targetRatio) };
  }
  const positions: Int32Array[] = [];
  const keptK: tf.Tensor3D[] = [];
  const keptV: tf.Tensor3D[] = [];
  try {
    for (let l = 0; l < L; l++) {
      let p: Int32Array;
      if (!sel || n === T) p = perHead(Int32Array.from({ length: T }, (_, i) => i), H);
      else if (sel.impliedPositions) p = perHead(sel.impliedPositions(T, n), H);
      else {
        const post = applyRope(cache.keys[l], cache.rope, { start: cache.startPosition ?? 0, count: T }) as tf.Tensor3D;
        let chosen: Int32Array | tf.Tensor2D | null;
        try {
          chosen = await sel.select(cache, l, post, T, n);
        } finally {
          post.dispose();
        }
        if (chosen === null) p = perHead(Int32Array.from({ length: T }, (_, i) => i), H);
        else if (chosen instanceof tf.Tensor) {
          // [H, n] on the backend → [n, H] on the host.
          const hn = (await chosen.data().finally(() => chosen!.dispose())) as Int32Array;
          p = new Int32Array(n * H);
          for (let h = 0; h < H; h++) for (let j = 0; j < n; j++) p[j * H + h] = hn[h * n + j];
        } else p = chosen;
      }
      check(p.length === n * H && p.every((t) => t >= 0 && t < T), 'shape', `${stages.strategy}: the eviction stage gave ${p.length / H} positions per head in layer ${l}, expected ${n} in [0, ${T})`);
      positions.push(p);
      keptK.push(gatherKept(cache.keys[l], p));
      keptV.push(gatherKept(cache.values[l], p));
    }
    const kept: KVCache = { layout, rope: cache.rope, keys: keptK, values: keptV, startPosition: 0 };
    const lowRank = await compressGroupSvd(kept, stages.strategy, stages.options, config, n);
    return new StackedCache(stages.strategy, stages.options, layout, cache.rope, T, cache.startPosition ?? 0, positions, stored, lowRank, stages.evictLabel);
  } finally {
    tf.dispose([...keptK, ...keptV]);
  }
}

/** Bytes a composed cache holds right after compress at these group ranks: factors + positions. */
export function stackedBytes(config: GroupSvdConfig, layout: ModelLayout, T: number, n: number, storedPositions: boolean, ranks: GroupRanks): number {
  return lowRankBytes(config, layout, n, ranks) + keptPositionBytes(layout, T, n, storedPositions);
}

