import * as tf from '@tensorflow/tfjs-core';
import { check, denseCacheBytes, sharedRopeTableBytes, type CompressedCache, type KVCache } from '@kvpack/core';
import { buildStrategy, strategyPaperRatio } from '../strategy.js';
import { stepTiming } from './baselines.js';
import { decodeModes } from './decode-modes.js';
import { factoredShapes, floorMs } from './floors.js';
import type { ResolvedPerfSetting } from './settings.js';
import { measurePeakMemory, summarize, timeOp, type Timing } from './stats.js';
import type { PerfBaseline, PerfRow } from './suite-types.js';

// One setting on one cache: compression, reconstruction, decode modes, bytes and memory.

/**
 * Compresses `cache` with a setting: a profiled warm-up run (peak memory), further warm-ups, then
 * `reps` timed runs; keeps the last run's compressed cache. `baseBytes` is the engine's tensor-byte
 * count just before that last run (so later counts minus it are what the kept cache holds).
 */
async function timedCompress(
  setting: ResolvedPerfSetting,
  cache: KVCache,
  reps: number,
  warmup: number,
): Promise<{ timing: Timing; compressed: CompressedCache; peakBytes: number; residentBytes: number; baseBytes: number }> {
  const strategy = buildStrategy(setting);
  const prof = await measurePeakMemory(() => strategy.compress(cache));
  const samples: number[] = [];
  let kept: CompressedCache | null = null;
  let baseBytes = 0;
  // warmup ≥ 1 and reps ≥ 1: the profiled run is the first warm-up, so this loop runs at least once.
  for (let i = 1; i < warmup + reps; i++) {
    kept?.dispose();
    baseBytes = tf.memory().numBytes - sharedRopeTableBytes();
    const t0 = performance.now();
    kept = await strategy.compress(cache);
    const dt = performance.now() - t0;
    if (i >= warmup) samples.push(dt);
  }
  check(kept, 'config', 'timedCompress: warmup and reps must both be ≥ 1');
  return { timing: summarize(samples, warmup), compressed: kept, peakBytes: prof.peakBytes, residentBytes: tf.memory().numBytes - sharedRopeTableBytes() - baseBytes, baseBytes };
}

/** Measures one setting on one cache. Never throws for a strategy failure: the row carries the error. */
export async function measureSetting(
  setting: ResolvedPerfSetting,
  cache: KVCache,
  baseline: PerfBaseline,
  q: tf.Tensor3D,
  o: { reps: number; warmup: number; sparseBudget: number },
): Promise<PerfRow> {
  const T = cache.keys[0].shape[0];
  const L = cache.layout.nLayers;
  const row: PerfRow = {
    setting: setting.label,
    strategy: setting.name,
    options: setting.options,
    tokens: T,
    layers: L,
    compress: null,
    compressPerLayerMs: null,
    compressVsFloor: null,
    reconstructKeys: null,
    reconstructValues: null,
    decode: [],
    bytes: 0,
    ratio: 0,
    paperRatio: null,
    residentBytes: 0,
    residentAfterDecodeBytes: 0,
    sharedRopeBytes: 0,
    compressPeakBytes: 0,
  };
  let compressed: CompressedCache | null = null;
  try {
    const c = await timedCompress(setting, cache, o.reps, o.warmup);
    compressed = c.compressed;
    row.compress = c.timing;
    row.compressPerLayerMs = c.timing.medianMs / L;
    row.compressPeakBytes = c.peakBytes;
    row.residentBytes = c.residentBytes;
    const shapes = factoredShapes(setting, cache.layout, L);
    if (shapes.length) row.compressVsFloor = c.timing.medianMs / floorMs(shapes, baseline.floors, T);
    row.bytes = compressed.byteSize();
    row.ratio = denseCacheBytes(cache.layout, T) / row.bytes;
    row.paperRatio = strategyPaperRatio(setting, cache.layout, T);
    const layer = L - 1; // the last layer: merged by MiniCache, in the last xKV group
    const cc = compressed;
    row.reconstructKeys = await timeOp(() => cc.keys(layer), stepTiming(o));
    row.reconstructValues = await timeOp(() => cc.values(layer), stepTiming(o));
    for (const m of decodeModes(compressed, { sparseBudget: o.sparseBudget })) {
      const timing = await timeOp(() => m.step(layer, q), stepTiming(o));
      const mem = await measurePeakMemory(() => m.step(layer, q));
      row.decode.push({
        mode: m.mode,
        label: m.label,
        timing,
        vsDense: timing.medianMs / baseline.denseBestMs,
        vsCoreAttention: timing.medianMs / baseline.denseAttention.medianMs,
        peakBytes: mem.peakBytes,
      });
      m.dispose?.();
    }
    // The shared device RoPE tables (one per position range, for every cache and layer) are not the cache's.
    row.residentAfterDecodeBytes = tf.memory().numBytes - sharedRopeTableBytes() - c.baseBytes;
    row.sharedRopeBytes = sharedRopeTableBytes();
  } catch (e) {
    row.error = (e as Error).message.split('\n')[0];
  } finally {
    compressed?.dispose();
  }
  return row;
}

/** One log line for a finished row. */
export function rowLine(r: PerfRow): string {
  if (r.error) return `T=${r.tokens} ${r.setting}: FAILED: ${r.error}`;
  const d = r.decode.map((x) => `${x.mode} ${x.timing.medianMs.toFixed(1)} ms (${x.vsDense.toFixed(2)}× dense)`).join(', ');
  return (
    `T=${r.tokens} ${r.setting}: compress ${r.compress!.medianMs.toFixed(0)} ms` +
    (r.compressVsFloor !== null ? ` (${r.compressVsFloor.toFixed(2)}× matmul floor)` : '') +
    `, reconstruct K ${r.reconstructKeys!.medianMs.toFixed(1)} / V ${r.reconstructValues!.medianMs.toFixed(1)} ms, decode ${d}, ratio ${r.ratio.toFixed(2)}×`
  );
}
