import * as tf from '@tensorflow/tfjs-core';
import { check, disposeKVCache, type ModelLayout } from '@kvpack/core';
import { readKVDump } from '@kvpack/models';
import { measureDenseAttention, decodeQuery } from './baselines.js';
import { compressCheck, sparseDecodeCheck } from './checks.js';
import { factoredShapes, measureMatmulFloor } from './floors.js';
import { loadCache } from './load-cache.js';
import { measureSetting, rowLine } from './measure.js';
import { PERF_SETTINGS, resolvedSetting, withSparseBudget } from './settings.js';
import type { RatioCheck } from './stats.js';
import type { CompressCheckDetail, MatmulFloor, PerfBaseline, PerfHooks, PerfRow, PerfSuiteOptions, PerfSuiteResult } from './suite-types.js';
import { LLAMA31_8B_LAYOUT } from './synthetic.js';

export type * from './suite-types.js';
export { STEP_BATCH, measureDenseAttention, stepTiming } from './baselines.js';
export { compressCheckLabel, keyRebuildVsDense } from './checks.js';
export { factoredShapes, floorMs, measureMatmulFloor } from './floors.js';
export { rowLine } from './measure.js';

/** Default layers per cache: Llama's 32 on GPU backends, 4 (one xKV group) on wasm/cpu. */
export function defaultLayers(backend = tf.getBackend()): number {
  return backend === 'wasm' || backend === 'cpu' ? 4 : LLAMA31_8B_LAYOUT.nLayers;
}

/**
 * The perf suite: for each T and each setting, on a Llama-3.1-8B-shaped cache (a KV dump
 * or {@link syntheticLlamaCache}): ms to compress, ms to reconstruct one layer's keys (with RoPE) and
 * values, ms per decode step of one query token over one layer (each decode mode), bytes and ratio,
 * peak tensor memory — every time a median of `reps` runs after `warmup` warm-ups — next to
 * baselines measured in the same run (dense attention over the uncompressed layer; the dense
 * matmuls X·Ω and Qᵀ·X of the factored shapes). Then the target checks ({@link PerfSuiteResult.checks}).
 * Select the backend first.
 * @throws KvpackError('config') for bad options.
 */
export async function runPerfSuite(opts: PerfSuiteOptions = {}, hooks: PerfHooks = {}): Promise<PerfSuiteResult> {
  const tokens = opts.tokens ?? [4096, 8192, 16384, 32768];
  const sparseBudget = opts.sparseBudget ?? 2048;
  check(Number.isInteger(sparseBudget) && sparseBudget >= 1, 'config', `--sparse-budget must be a positive integer, got ${sparseBudget}`);
  const settings = withSparseBudget(opts.settings ?? [...PERF_SETTINGS], sparseBudget).map(resolvedSetting);
  const reps = opts.reps ?? 3;
  const warmup = opts.warmup ?? 1;
  const seed = opts.seed ?? 0;
  const runChecks = opts.checks ?? true;
  check(Number.isInteger(reps) && reps >= 1, 'config', `--reps must be an integer ≥ 1, got ${reps}`);
  check(Number.isInteger(warmup) && warmup >= 1, 'config', `warm-up runs must be an integer ≥ 1 (every figure is measured after warm-up), got ${warmup}`);
  check(tokens.length > 0 && tokens.every((t) => Number.isInteger(t) && t >= 1), 'config', `--tokens must be positive integers, got ${tokens.join(',')}`);
  const dump = opts.dump ? await readKVDump(opts.dump) : null;
  const layers = opts.layers ?? (dump ? Math.min(dump.layout.nLayers, defaultLayers()) : defaultLayers());
  check(Number.isInteger(layers) && layers >= 1, 'config', `--layers must be a positive integer, got ${layers}`);
  const log = hooks.log ?? (() => {});
  const o = { reps, warmup, sparseBudget };
  const total = tokens.length * (settings.length + 1) + (runChecks ? 2 : 0);
  let done = 0;
  const step = (label: string) => hooks.onStep?.(++done, total, label);
  hooks.onStart?.(total);

  const baselines: PerfBaseline[] = [];
  const rows: PerfRow[] = [];
  let layout: ModelLayout = dump ? { ...dump.layout, nLayers: layers } : { ...LLAMA31_8B_LAYOUT, nLayers: layers };
  try {
    for (const T of tokens) {
      const t0 = performance.now();
      const cache = await loadCache(T, layers, seed, dump);
      layout = cache.layout;
      log(`T=${T}: ${dump ? 'dump slice' : 'synthetic cache'} of ${cache.layout.nLayers} layers ready in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
      const q = decodeQuery(cache.layout, seed + 17);
      try {
        const layer = cache.layout.nLayers - 1;
        const dense = await measureDenseAttention(cache, layer, q, o);
        const floors: MatmulFloor[] = [];
        for (const s of settings) {
          for (const sh of factoredShapes(s, cache.layout, cache.layout.nLayers)) {
            if (floors.some((f) => f.features === sh.features && f.rank === sh.rank)) continue;
            floors.push(await measureMatmulFloor(cache, sh.features / (cache.layout.nKvHeads * cache.layout.headDim), sh.rank, { reps, warmup, seed }));
          }
        }
        const baseline: PerfBaseline = {
          tokens: T,
          layers: cache.layout.nLayers,
          denseAttention: dense.timing,
          denseReady: dense.ready,
          denseBestMs: dense.bestMs,
          denseAttentionPeakBytes: dense.peakBytes,
          floors,
        };
        baselines.push(baseline);
        step(`T=${T} baselines`);
        for (const s of settings) {
          const row = await measureSetting(s, cache, baseline, q, o);
          rows.push(row);
          log(rowLine(row));
          step(`T=${T} ${s.label}`);
        }
      } finally {
        q.dispose();
        disposeKVCache(cache);
      }
    }
    const checks: RatioCheck[] = [];
    let compressDetail: CompressCheckDetail | undefined;
    const unavailable: { label: string; reason: string }[] = [];
    if (runChecks) {
      const r1 = await compressCheck(opts, { reps, warmup, seed }, log);
      if ('reason' in r1) unavailable.push(r1);
      else {
        const { detail, ...c } = r1;
        checks.push(c);
        compressDetail = detail;
      }
      step('check: group compression');
      const r2 = await sparseDecodeCheck(opts, { reps, warmup, seed, sparseBudget }, dump, log);
      if ('reason' in r2) unavailable.push(r2);
      else checks.push(r2);
      step('check: sparse decode');
    }
    return {
      layout,
      source: dump ? `KV dump ${opts.dump}` : 'synthetic (syntheticLlamaCache)',
      tokens,
      layers,
      reps,
      warmup,
      sparseBudget,
      settings,
      baselines,
      rows,
      checks,
      ...(compressDetail ? { compressDetail } : {}),
      unavailable,
    };
  } finally {
    if (dump) disposeKVCache(dump);
  }
}
