import * as tf from '@tensorflow/tfjs-core';
import { applyRope, attention, countWebGpuDispatches, createStrategy, disposeKVCache, gaussianMatrix, type CompressedCache, type KVCache } from '@kvpack/core';
import { attendWith } from '@kvpack/strategy-utils/internal';
import { decodeQuery, stepTiming } from './baselines.js';
import { decodeModes } from './decode-modes.js';
import { attentionReadyLayer, denseDecodeStep, disposeAttentionReady } from './dense-step.js';
import { groupMatrix } from './floors.js';
import { loadCache } from './load-cache.js';
import { isSynchronousBackend, ratioCheck, timeInterleaved, type RatioCheck } from './stats.js';
import { PERF_SETTINGS } from './settings.js';
import type { CompressCheckDetail, PerfSuiteOptions } from './suite-types.js';
import { LLAMA31_8B_LAYOUT, syntheticLlamaCache } from './synthetic.js';

// The target checks of xKV's claims: group compression against its matmul floor, and the
// sparse decode step against dense attention.

/** Label of the compression check at T tokens. */
export function compressCheckLabel(backend: string, T: number, F: number, r: number): string {
  return `${backend}: compress K+V of one G=4 group [${T}, ${F}] r=${r}`;
}

/**
 * Target 1: xkv compression of one G = 4 group (X = [T, 4·H_kv·d], default T = 8,192) at group
 * rank 4 × checkRank (512) for keys and values, against the two dense matmuls X·Ω and Qᵀ·X of both
 * matrices at the same sizes (Ω [4·H_kv·d, r], Qᵀ [r, T], plain products). The three are timed in
 * alternation ({@link timeInterleaved}), so the ratio does not drift with the machine's load.
 * Target ≤ 3×.
 */
export async function compressCheck(
  opts: PerfSuiteOptions,
  o: { reps: number; warmup: number; seed: number },
  log: (l: string) => void,
): Promise<(RatioCheck & { detail: CompressCheckDetail }) | { label: string; reason: string }> {
  const T = opts.checkCompressTokens ?? 8192;
  const rank = opts.checkRank ?? 128;
  const G = 4;
  const baselineLabels = opts.checkBaselines ?? [];
  // The observation-window queries let SnapKV compress this cache too (and the peer reads them).
  const cache = await syntheticLlamaCache({ T, layers: G, seed: o.seed + 1, ...(baselineLabels.length ? { observationWindow: 32 } : {}) });
  const F = G * cache.layout.nKvHeads * cache.layout.headDim;
  const r = G * rank;
  const label = compressCheckLabel(tf.getBackend(), T, F, r);
  const X = groupMatrix(cache, G);
  const omega = gaussianMatrix(F, r, o.seed + 1);
  const qt = gaussianMatrix(r, T, o.seed + 2);
  try {
    await opts.onCheckCache?.(cache);
    const strategy = createStrategy({ name: 'xkv', options: { layersPerGroup: G, rankK: rank, rankV: rank } });
    const t = await timeInterleaved(
      { compress: () => strategy.compress(cache), xOmega: () => tf.matMul(X, omega), qtX: () => tf.matMul(qt, X) },
      { reps: o.reps, warmup: o.warmup },
    );
    const floor2 = 2 * (t.xOmega.medianMs + t.qtX.medianMs);
    const res = ratioCheck(
      label,
      t.compress.medianMs,
      floor2,
      // The ≤ 3× target is the CPU target (wasm, cpu; tensorflow too, which may be tfjs-node on the CPU);
      // on webgpu the target is the PyTorch comparison (gpu-perf.ts --peer).
      isSynchronousBackend() ? 3 : null,
      'the two matmuls X·Ω + Qᵀ·X (keys and values)',
      `X·Ω ${t.xOmega.medianMs.toFixed(1)} ms, Qᵀ·X ${t.qtX.medianMs.toFixed(1)} ms per matrix, timed in alternation with the compression; ` +
        'xkv defaults otherwise (oversampling, power iterations from the xkv schema)',
    );
    log(res.line);
    const relErr = await groupRelErr(await strategy.compress(cache), cache);
    const baselineMs: Record<string, number> = {};
    const baselineKernels: Record<string, { dispatches: number; readbacks: number }> = {};
    for (const bl of baselineLabels) {
      const s = PERF_SETTINGS.find((x) => x.label === bl);
      if (!s) throw new Error(`unknown perf setting "${bl}" (settings: ${PERF_SETTINGS.map((x) => x.label).join(', ')})`);
      const st = createStrategy({ name: s.name, options: s.options });
      const tb = await timeInterleaved({ compress: () => st.compress(cache) }, { reps: o.reps, warmup: o.warmup });
      baselineMs[bl] = tb.compress.medianMs;
      // One more compress, its GPU kernels (dispatches) and host readbacks counted (webgpu only).
      const counted = await countWebGpuDispatches(() => st.compress(cache));
      counted.result.dispose();
      if (counted.dispatches !== null) baselineKernels[bl] = { dispatches: counted.dispatches, readbacks: counted.readbacks! };
      const kernels = counted.dispatches === null ? '' : `; ${counted.dispatches} kernels, ${counted.readbacks} readbacks per compress`;
      log(`${bl}: compress of the check's ${G}-layer cache [${T}] ${tb.compress.medianMs.toFixed(1)} ms${kernels}`);
    }
    return { ...res, detail: { tokens: T, features: F, rank: r, compressMs: t.compress.medianMs, relErr, baselineMs, baselineKernels } };
  } catch (e) {
    return { label, reason: (e as Error).message.split('\n')[0] };
  } finally {
    tf.dispose([X, omega, qt]);
    disposeKVCache(cache);
  }
}

/**
 * Relative Frobenius error of a compressed group, ‖X̂ − X‖ / ‖X‖ over all its layers, for keys and
 * values. Keys are compared post-RoPE: RoPE rotates each token's pairs, so the error equals the
 * pre-RoPE one. Disposes `compressed`.
 */
export async function groupRelErr(compressed: CompressedCache, cache: KVCache): Promise<{ xk: number; xv: number }> {
  try {
    const T = cache.keys[0].shape[0];
    const sums = tf.tidy(() => {
      const acc = [tf.scalar(0), tf.scalar(0), tf.scalar(0), tf.scalar(0)];
      for (let l = 0; l < cache.layout.nLayers; l++) {
        const K = applyRope(cache.keys[l], cache.rope, { start: cache.startPosition ?? 0, count: T });
        const V = cache.values[l];
        acc[0] = tf.add(acc[0], tf.sum(tf.square(tf.sub(compressed.keys(l), K))));
        acc[1] = tf.add(acc[1], tf.sum(tf.square(K)));
        acc[2] = tf.add(acc[2], tf.sum(tf.square(tf.sub(compressed.values(l), V))));
        acc[3] = tf.add(acc[3], tf.sum(tf.square(V)));
      }
      return tf.stack(acc);
    });
    const [ek, nk, ev, nv] = await sums.data();
    sums.dispose();
    return { xk: Math.sqrt(ek / nk), xv: Math.sqrt(ev / nv) };
  } finally {
    compressed.dispose();
  }
}

/**
 * Multiply–adds of rebuilding a sparse step's selected keys (H_kv · S · R_k · d: S rows per KV head at
 * group rank R_k) over those of dense attention of one query token (2 · T · H · d: scores and values):
 * the compute floor of sparse decode relative to dense at these ranks (4.0 at T = 32K, S = 2,048,
 * R_k = 512 on Llama-3.1-8B). A compute-bound backend (wasm) cannot beat it; a GPU, where dense
 * attention at one query is bound by memory and launches, can.
 */
export function keyRebuildVsDense(layout: { nHeads: number; nKvHeads: number; headDim: number }, T: number, S: number, Rk: number): number {
  return (layout.nKvHeads * S * Rk * layout.headDim) / (2 * T * layout.nHeads * layout.headDim);
}

/**
 * Target 3: one decode step in xkv's sparse mode (budget `sparseBudget`) at T = 32K over one
 * layer, against dense attention over the same uncompressed layer — the faster of core `attention`
 * and {@link denseDecodeStep} over the attention-ready layout — timed in alternation. The cache is
 * one G = 4 group at the paper's ranks (512/768) compressed with `decode: 'sparse'`. Target ≤ 2× on
 * wasm/cpu, ≤ 1× on a GPU backend.
 * The per-step attention is per layer, so one layer's step is what is compared.
 */
export async function sparseDecodeCheck(
  opts: PerfSuiteOptions,
  o: { reps: number; warmup: number; seed: number; sparseBudget: number },
  dump: KVCache | null,
  log: (l: string) => void,
): Promise<RatioCheck | { label: string; reason: string }> {
  const T = opts.checkDecodeTokens ?? 32768;
  const ranks = opts.checkDecodeRanks ?? { rankK: 128, rankV: 192 };
  const label = `${tf.getBackend()}: decode step, sparse mode, T=${T}, budget ${o.sparseBudget} (one layer)`;
  let cache: KVCache | null = null;
  let compressed: CompressedCache | null = null;
  let K: tf.Tensor3D | null = null;
  let ready: ReturnType<typeof attentionReadyLayer> | null = null;
  const q = decodeQuery(dump?.layout ?? LLAMA31_8B_LAYOUT, o.seed + 17);
  try {
    cache = dump && dump.keys[0].shape[0] >= T ? await loadCache(T, 4, o.seed, dump) : await syntheticLlamaCache({ T, layers: 4, seed: o.seed });
    const layer = cache.layout.nLayers - 1;
    const strategy = createStrategy({ name: 'xkv', options: { layersPerGroup: 4, ...ranks, decode: 'sparse', sparse: { budget: o.sparseBudget } } });
    compressed = await strategy.compress(cache);
    const mode = decodeModes(compressed, { sparseBudget: o.sparseBudget }).find((m) => m.mode === 'sparse');
    if (!mode) return { label, reason: 'the xkv cache offers no sparse decode mode in this build' };
    K = applyRope(cache.keys[layer], cache.rope, { start: cache.startPosition ?? 0, count: T });
    ready = attentionReadyLayer(K, cache.values[layer]);
    const V = cache.values[layer];
    const [k, rd, xc] = [K, ready, compressed];
    // On webgpu the step runs as WGSL kernels; the tfjs-op formulation of the same step is timed next to it.
    const ops: Record<string, () => tf.Tensor> = { sparse: () => mode.step(layer, q), core: () => attention(q, k, V, 0), ready: () => denseDecodeStep(q, rd) };
    if (tf.getBackend() === 'webgpu') ops.tfjsOps = () => attendWith(xc, layer, q, { budget: o.sparseBudget, kernels: 'tfjs' });
    const t = await timeInterleaved(ops, stepTiming(o));
    const counted = await countWebGpuDispatches(() => mode.step(layer, q));
    counted.result.dispose();
    const dense = Math.min(t.core.medianMs, t.ready.medianMs);
    const res = ratioCheck(
      label,
      t.sparse.medianMs,
      dense,
      // On a GPU, where dense attention of one query is bound by memory, the sparse step must not be slower; on wasm/cpu ≤ 2×.
      isSynchronousBackend() ? 2 : 1,
      'dense attention over the uncompressed layer',
      `one query token, one layer (the step is per layer), timed in alternation; dense = the faster of core attention ` +
        `(${t.core.medianMs.toFixed(1)} ms, sparse is ${(t.sparse.medianMs / t.core.medianMs).toFixed(2)}× it) and the attention-ready layout ` +
        `(${t.ready.medianMs.toFixed(1)} ms); xkv G=4 r=${4 * ranks.rankK}/${4 * ranks.rankV}` +
        `; rebuilding the selected keys alone is ${keyRebuildVsDense(cache.layout, T, o.sparseBudget, 4 * ranks.rankK).toFixed(2)}× dense attention's multiply–adds` +
        (t.tfjsOps ? `; sparse step as WGSL kernels; the same step composed of tfjs ops: ${t.tfjsOps.medianMs.toFixed(2)} ms` : '') +
        (counted.dispatches === null ? '' : `; ${counted.dispatches} kernels, ${counted.readbacks} readbacks per step`),
    );
    log(res.line);
    return res;
  } catch (e) {
    return { label, reason: (e as Error).message.split('\n')[0] };
  } finally {
    q.dispose();
    K?.dispose();
    if (ready) disposeAttentionReady(ready);
    compressed?.dispose();
    if (cache) disposeKVCache(cache);
  }
}
