import * as tf from '@tensorflow/tfjs-core';
import {
  applyRope,
  attention,
  check,
  createStrategy,
  denseCacheBytes,
  gaussianMatrix,
  type CompressedCache,
  type KVCache,
  type ModelLayout,
} from '@kvpack/core';
import { lowRankStats } from '@kvpack/strategy-utils';
import { attendWith } from '@kvpack/strategy-utils/internal';
import { readKVDump } from '@kvpack/models';
import { decodeModes } from './decode-modes.js';
import { attentionReadyLayer, denseDecodeStep, disposeAttentionReady } from './dense-step.js';
import { PERF_SETTINGS, withSparseBudget, type PerfSetting } from './settings.js';
import { isSynchronousBackend, measurePeakMemory, ratioCheck, summarize, timeInterleaved, timeOp, type RatioCheck, type Timing } from './stats.js';
import { LLAMA31_8B_LAYOUT, syntheticLlamaCache } from './synthetic.js';

/** Options of {@link runPerfSuite}. */
export interface PerfSuiteOptions {
  /** Prefill lengths T (default 4K, 8K, 16K, 32K). */
  tokens?: number[];
  /** Strategy settings (default {@link PERF_SETTINGS}). */
  settings?: PerfSetting[];
  /** Layers per generated cache (Llama-3.1-8B has 32; default 32, or 4 on wasm/cpu). */
  layers?: number;
  /** Timed runs per figure (default 3); the median is reported. */
  reps?: number;
  /** Untimed warm-up runs before them (default 1, at least 1). */
  warmup?: number;
  /** Seed of the synthetic caches and queries (default 0). */
  seed?: number;
  /** Token budget of xkv's sparse decode mode (default 2,048). */
  sparseBudget?: number;
  /** Read the cache from this KV dump (`readKVDump`) instead of generating it; T ≤ the dump's length. */
  dump?: string;
  /** Run the must-show checks (default true). */
  checks?: boolean;
  /** T of the compression check (default 8,192: X = [8192, 4096]). */
  checkCompressTokens?: number;
  /** T of the sparse-decode check (default 32,768). */
  checkDecodeTokens?: number;
  /** Per-layer rank of the compression check: group rank = 4 × this (default 128 → 512). */
  checkRank?: number;
  /** Per-layer ranks of the sparse-decode check's xkv cache (default the paper's 128 / 192: group ranks 512 / 768). */
  checkDecodeRanks?: { rankK: number; rankV: number };
  /**
   * Called with the compression check's 4-layer cache before it is compressed (e.g. to write its
   * group matrices for the PyTorch peer, as gpu-perf.ts does).
   */
  onCheckCache?: (cache: KVCache) => Promise<void> | void;
}

/** Progress and log callbacks of {@link runPerfSuite}. */
export interface PerfHooks {
  onStart?(total: number): void;
  onStep?(done: number, total: number, label: string): void;
  log?(line: string): void;
}

/** One decode mode's step time over a compressed cache. */
export interface DecodeResult {
  mode: string;
  label: string;
  /** One query token's attention over one layer's cache (ms). */
  timing: Timing;
  /** timing.median / the faster dense attention step over the uncompressed layer, same T ({@link PerfBaseline.denseBestMs}). */
  vsDense: number;
  /** timing.median / core `attention` over the uncompressed layer's [T, H_kv, d] tensors. */
  vsCoreAttention: number;
  /** Peak tensor bytes of one step above what was held before it. */
  peakBytes: number;
}

/** The measurements of one setting at one T. */
export interface PerfRow {
  setting: string;
  strategy: string;
  options: Record<string, unknown>;
  tokens: number;
  layers: number;
  /** Compressing the whole cache (all `layers`). */
  compress: Timing | null;
  /** compress median / layers. */
  compressPerLayerMs: number | null;
  /** compress median / the dense matmul floor of the same shapes (X·Ω + Qᵀ·X per factored matrix); low-rank strategies only. */
  compressVsFloor: number | null;
  /** Reconstructing one layer's post-RoPE keys, [N, H_kv, d]. */
  reconstructKeys: Timing | null;
  /** Reconstructing one layer's values. */
  reconstructValues: Timing | null;
  decode: DecodeResult[];
  /** Bytes the compressed cache holds (`byteSize()`, 16-bit counted as 2). */
  bytes: number;
  /** denseCacheBytes(layout, T) / bytes. */
  ratio: number;
  /** The xKV authors' formula, for xkv/svd. */
  paperRatio: number | null;
  /** Tensor bytes the compressed cache keeps on the backend right after compression (float32 working copies included). */
  residentBytes: number;
  /** The same after the decode steps: plus what the cache derived and keeps for decoding (e.g. per-head factors, sparse-mode tensors). */
  residentAfterDecodeBytes: number;
  /** Peak tensor bytes during compression, above the uncompressed cache. */
  compressPeakBytes: number;
  error?: string;
}

/** Baselines measured at one T, in the same run. */
export interface PerfBaseline {
  tokens: number;
  layers: number;
  /** One query token's dense attention over one uncompressed layer: core `attention` over post-RoPE keys and values [T, H_kv, d]. */
  denseAttention: Timing;
  /** The same over the layer stored attention-ready (per KV head Kᵀ [d, T] and V [T, d]: no transposes per step). */
  denseReady: Timing;
  /** min(denseAttention, denseReady) medians: the dense step every decode ratio divides by. */
  denseBestMs: number;
  denseAttentionPeakBytes: number;
  /** Dense matmul floors: X [T, F] · Ω [F, r] and Qᵀ [r, T] · X, plain products. */
  floors: MatmulFloor[];
}

/** The two dense products a rank-r range finder cannot avoid on X [T, F]. */
export interface MatmulFloor {
  tokens: number;
  features: number;
  rank: number;
  xOmega: Timing;
  qtX: Timing;
}

/** Result of {@link runPerfSuite}. */
export interface PerfSuiteResult {
  layout: ModelLayout;
  source: string;
  tokens: number[];
  layers: number;
  reps: number;
  warmup: number;
  sparseBudget: number;
  settings: PerfSetting[];
  baselines: PerfBaseline[];
  rows: PerfRow[];
  checks: RatioCheck[];
  /** Checks that could not be computed, with the reason. */
  unavailable: { label: string; reason: string }[];
}

const OBS_WINDOW = 32;

/** Default layers per cache: Llama's 32 on GPU backends, 4 (one xKV group) on wasm/cpu. */
export function defaultLayers(backend = tf.getBackend()): number {
  return backend === 'wasm' || backend === 'cpu' ? 4 : LLAMA31_8B_LAYOUT.nLayers;
}

/**
 * The factored matrices of a low-rank setting over `layers` layers: for xkv, per group of G layers,
 * X = [T, n·H_kv·d] at ranks n·rankK and n·rankV; for svd, per layer, [T, H_kv·d] at rankK, rankV.
 * Returns (features, rank, count) triples; empty for other strategies.
 */
export function factoredShapes(setting: PerfSetting, layout: ModelLayout, layers: number): { features: number; rank: number; count: number }[] {
  if (setting.name !== 'xkv' && setting.name !== 'svd') return [];
  const F = layout.nKvHeads * layout.headDim;
  const G = setting.name === 'xkv' ? Number(setting.options.groupSize ?? 4) : 1;
  const rk = Number(setting.options.rankK ?? 16);
  const rv = Number(setting.options.rankV ?? 24);
  const out = new Map<string, { features: number; rank: number; count: number }>();
  for (let s = 0; s < layers; s += G) {
    const n = Math.min(G, layers - s);
    for (const r of [rk * n, rv * n]) {
      const key = `${n * F}x${r}`;
      const e = out.get(key) ?? { features: n * F, rank: r, count: 0 };
      e.count++;
      out.set(key, e);
    }
  }
  return [...out.values()];
}

/**
 * Sum of the matmul floors over the factored matrices: Σ count · (X·Ω + Qᵀ·X) medians.
 * @throws KvpackError('shape') when a floor is missing.
 */
export function floorMs(shapes: { features: number; rank: number; count: number }[], floors: MatmulFloor[], tokens: number): number {
  let ms = 0;
  for (const s of shapes) {
    const f = floors.find((x) => x.tokens === tokens && x.features === s.features && x.rank === s.rank);
    check(f, 'shape', `no matmul floor measured for [${tokens}, ${s.features}] rank ${s.rank}`);
    ms += s.count * (f.xOmega.medianMs + f.qtX.medianMs);
  }
  return ms;
}

/** Group matrix [T, n·F] of the first n layers' pre-RoPE keys (what xKV factors). */
function groupMatrix(cache: KVCache, n: number): tf.Tensor2D {
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

/** A random post-RoPE decode query [1, H, d] with the keys' scale. */
function decodeQuery(layout: ModelLayout, seed: number): tf.Tensor3D {
  return tf.tidy(() => tf.reshape(gaussianMatrix(1, layout.nHeads * layout.headDim, seed), [1, layout.nHeads, layout.headDim]) as tf.Tensor3D);
}

/** Back-to-back runs per timed sample of a per-layer step (decode, reconstruction) on asynchronous backends. */
export const STEP_BATCH = 10;

/**
 * Timing options of per-layer steps (a decode step, one layer's reconstruction, the dense baselines):
 * on synchronous backends (wasm, cpu, tensorflow) the suite's reps and warm-ups; on asynchronous ones (webgpu) at least 5 samples of
 * {@link STEP_BATCH} back-to-back runs with one synchronization each (stats `TimeOptions.batch`), so a
 * few-ms step is not measured as one readback latency.
 */
export function stepTiming(o: { reps: number; warmup: number }): { reps: number; warmup: number; batch: number } {
  return isSynchronousBackend() ? { reps: o.reps, warmup: o.warmup, batch: 1 } : { reps: Math.max(o.reps, 5), warmup: o.warmup, batch: STEP_BATCH };
}

/**
 * Dense attention of one query over one uncompressed layer, two ways: core `attention` over the
 * cache's [T, H_kv, d] tensors (keys rotated once, outside the timing), and {@link denseDecodeStep}
 * over the layer stored attention-ready (laid out once, outside the timing).
 */
export async function measureDenseAttention(
  cache: KVCache,
  layer: number,
  q: tf.Tensor3D,
  opts: { reps: number; warmup: number },
): Promise<{ timing: Timing; ready: Timing; bestMs: number; peakBytes: number }> {
  const T = cache.keys[layer].shape[0];
  const K = applyRope(cache.keys[layer], cache.rope, { start: cache.startPosition ?? 0, count: T });
  const ready = attentionReadyLayer(K, cache.values[layer]);
  try {
    const timing = await timeOp(() => attention(q, K, cache.values[layer], 0), stepTiming(opts));
    const fast = await timeOp(() => denseDecodeStep(q, ready), stepTiming(opts));
    const mem = await measurePeakMemory(() => attention(q, K, cache.values[layer], 0));
    return { timing, ready: fast, bestMs: Math.min(timing.medianMs, fast.medianMs), peakBytes: mem.peakBytes };
  } finally {
    K.dispose();
    disposeAttentionReady(ready);
  }
}

/**
 * Compresses `cache` with a setting: a profiled warm-up run (peak memory), further warm-ups, then
 * `reps` timed runs; keeps the last run's compressed cache. `baseBytes` is the engine's tensor-byte
 * count just before that last run (so later counts minus it are what the kept cache holds).
 */
async function timedCompress(
  setting: PerfSetting,
  cache: KVCache,
  reps: number,
  warmup: number,
): Promise<{ timing: Timing; compressed: CompressedCache; peakBytes: number; residentBytes: number; baseBytes: number }> {
  const strategy = createStrategy({ name: setting.name, options: setting.options });
  const prof = await measurePeakMemory(() => strategy.compress(cache));
  const samples: number[] = [];
  let kept: CompressedCache | null = null;
  let baseBytes = 0;
  // warmup ≥ 1 and reps ≥ 1: the profiled run is the first warm-up, so this loop runs at least once.
  for (let i = 1; i < warmup + reps; i++) {
    kept?.dispose();
    baseBytes = tf.memory().numBytes;
    const t0 = performance.now();
    kept = await strategy.compress(cache);
    const dt = performance.now() - t0;
    if (i >= warmup) samples.push(dt);
  }
  check(kept, 'config', 'timedCompress: warmup and reps must both be ≥ 1');
  return { timing: summarize(samples, warmup), compressed: kept, peakBytes: prof.peakBytes, residentBytes: tf.memory().numBytes - baseBytes, baseBytes };
}

/** Measures one setting on one cache. Never throws for a strategy failure: the row carries the error. */
async function measureSetting(
  setting: PerfSetting,
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
    row.paperRatio = lowRankStats(compressed)?.paperRatio ?? null;
    const layer = L - 1; // the last layer: merged by MiniCache, in the last xKV group
    const cc = compressed;
    row.reconstructKeys = await timeOp(() => cc.keys(layer), stepTiming(o));
    row.reconstructValues = await timeOp(() => cc.values(layer), stepTiming(o));
    for (const m of decodeModes(setting.name, compressed, { sparseBudget: o.sparseBudget })) {
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
    row.residentAfterDecodeBytes = tf.memory().numBytes - c.baseBytes;
  } catch (e) {
    row.error = (e as Error).message.split('\n')[0];
  } finally {
    compressed?.dispose();
  }
  return row;
}

/** Loads the cache for one T: a slice of the dump, or a synthetic Llama-3.1-8B-shaped cache. */
async function loadCache(T: number, layers: number, seed: number, dump: KVCache | null): Promise<KVCache> {
  if (!dump) return syntheticLlamaCache({ T, layers, seed, observationWindow: OBS_WINDOW });
  const Td = dump.keys[0].shape[0];
  check(T <= Td, 'config', `--tokens ${T} exceeds the dump's ${Td} tokens`);
  const L = Math.min(layers, dump.layout.nLayers);
  const sl = (x: tf.Tensor3D) => tf.slice(x, [0, 0, 0], [T, -1, -1]) as tf.Tensor3D;
  const queries = dump.queries && T === Td ? dump.queries.slice(0, L).map((x) => tf.clone(x)) : undefined;
  return {
    layout: { ...dump.layout, nLayers: L },
    rope: dump.rope,
    startPosition: dump.startPosition,
    keys: dump.keys.slice(0, L).map(sl),
    values: dump.values.slice(0, L).map(sl),
    ...(queries ? { queries } : {}),
  };
}

function disposeCache(c: KVCache): void {
  tf.dispose([...c.keys, ...c.values, ...(c.queries ?? [])]);
}

/**
 * The perf suite (issue 5): for each T and each setting, on a Llama-3.1-8B-shaped cache (a KV dump
 * or {@link syntheticLlamaCache}): ms to compress, ms to reconstruct one layer's keys (with RoPE) and
 * values, ms per decode step of one query token over one layer (each decode mode), bytes and ratio,
 * peak tensor memory — every time a median of `reps` runs after `warmup` warm-ups — next to
 * baselines measured in the same run (dense attention over the uncompressed layer; the dense
 * matmuls X·Ω and Qᵀ·X of the factored shapes). Then the must-show checks ({@link PerfSuiteResult.checks}).
 * Select the backend first.
 * @throws KvpackError('config') for bad options.
 */
export async function runPerfSuite(opts: PerfSuiteOptions = {}, hooks: PerfHooks = {}): Promise<PerfSuiteResult> {
  const tokens = opts.tokens ?? [4096, 8192, 16384, 32768];
  const sparseBudget = opts.sparseBudget ?? 2048;
  check(Number.isInteger(sparseBudget) && sparseBudget >= 1, 'config', `--sparse-budget must be a positive integer, got ${sparseBudget}`);
  const settings = withSparseBudget(opts.settings ?? [...PERF_SETTINGS], sparseBudget);
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
        disposeCache(cache);
      }
    }
    const checks: RatioCheck[] = [];
    const unavailable: { label: string; reason: string }[] = [];
    if (runChecks) {
      const r1 = await compressCheck(opts, { reps, warmup, seed }, log);
      if ('reason' in r1) unavailable.push(r1);
      else checks.push(r1);
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
      unavailable,
    };
  } finally {
    if (dump) disposeCache(dump);
  }
}

/** Label of the compression check at T tokens. */
export function compressCheckLabel(backend: string, T: number, F: number, r: number): string {
  return `${backend}: compress K+V of one G=4 group [${T}, ${F}] r=${r}`;
}

/**
 * Must-show 1: xkv compression of one G = 4 group (X = [T, 4·H_kv·d], default T = 8,192) at group
 * rank 4 × checkRank (512) for keys and values, against the two dense matmuls X·Ω and Qᵀ·X of both
 * matrices at the same sizes (Ω [4·H_kv·d, r], Qᵀ [r, T], plain products). The three are timed in
 * alternation ({@link timeInterleaved}), so the ratio does not drift with the machine's load.
 * Target ≤ 3×.
 */
async function compressCheck(
  opts: PerfSuiteOptions,
  o: { reps: number; warmup: number; seed: number },
  log: (l: string) => void,
): Promise<RatioCheck | { label: string; reason: string }> {
  const T = opts.checkCompressTokens ?? 8192;
  const rank = opts.checkRank ?? 128;
  const G = 4;
  const cache = await syntheticLlamaCache({ T, layers: G, seed: o.seed + 1 });
  const F = G * cache.layout.nKvHeads * cache.layout.headDim;
  const r = G * rank;
  const label = compressCheckLabel(tf.getBackend(), T, F, r);
  const X = groupMatrix(cache, G);
  const omega = gaussianMatrix(F, r, o.seed + 1);
  const qt = gaussianMatrix(r, T, o.seed + 2);
  try {
    await opts.onCheckCache?.(cache);
    const strategy = createStrategy({ name: 'xkv', options: { groupSize: G, rankK: rank, rankV: rank } });
    const t = await timeInterleaved(
      { compress: () => strategy.compress(cache), xOmega: () => tf.matMul(X, omega), qtX: () => tf.matMul(qt, X) },
      { reps: o.reps, warmup: o.warmup },
    );
    const floor2 = 2 * (t.xOmega.medianMs + t.qtX.medianMs);
    const res = ratioCheck(
      label,
      t.compress.medianMs,
      floor2,
      // The ≤ 3× target is the CPU must-show (wasm, cpu; tensorflow too, which may be tfjs-node on the CPU);
      // on webgpu the target is the PyTorch comparison (gpu-perf.ts --peer).
      isSynchronousBackend() ? 3 : null,
      'the two matmuls X·Ω + Qᵀ·X (keys and values)',
      `X·Ω ${t.xOmega.medianMs.toFixed(1)} ms, Qᵀ·X ${t.qtX.medianMs.toFixed(1)} ms per matrix, timed in alternation with the compression; ` +
        'xkv defaults otherwise (oversampling, power iterations from the xkv schema)',
    );
    log(res.line);
    return res;
  } catch (e) {
    return { label, reason: (e as Error).message.split('\n')[0] };
  } finally {
    tf.dispose([X, omega, qt]);
    disposeCache(cache);
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
 * Must-show 3: one decode step in xkv's sparse mode (budget `sparseBudget`) at T = 32K over one
 * layer, against dense attention over the same uncompressed layer — the faster of core `attention`
 * and {@link denseDecodeStep} over the attention-ready layout — timed in alternation. The cache is
 * one G = 4 group at the paper's ranks (512/768) compressed with `decode: 'sparse'`. Target ≤ 2×.
 * The per-step attention is per layer, so one layer's step is what is compared.
 */
async function sparseDecodeCheck(
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
    const strategy = createStrategy({ name: 'xkv', options: { groupSize: 4, ...ranks, decode: 'sparse', sparse: { budget: o.sparseBudget } } });
    compressed = await strategy.compress(cache);
    const mode = decodeModes('xkv', compressed, { sparseBudget: o.sparseBudget }).find((m) => m.mode === 'sparse');
    if (!mode) return { label, reason: 'the xkv cache offers no sparse decode mode in this build' };
    K = applyRope(cache.keys[layer], cache.rope, { start: cache.startPosition ?? 0, count: T });
    ready = attentionReadyLayer(K, cache.values[layer]);
    const V = cache.values[layer];
    const [k, rd] = [K, ready];
    // On webgpu the step runs as WGSL kernels; the tfjs-op formulation of the same step is timed next to it.
    const xc = compressed;
    const ops: Record<string, () => tf.Tensor> = { sparse: () => mode.step(layer, q), core: () => attention(q, k, V, 0), ready: () => denseDecodeStep(q, rd) };
    if (tf.getBackend() === 'webgpu') ops.tfjsOps = () => attendWith(xc, layer, q, { budget: o.sparseBudget, kernels: 'tfjs' });
    const t = await timeInterleaved(ops, stepTiming(o));
    const dense = Math.min(t.core.medianMs, t.ready.medianMs);
    const res = ratioCheck(
      label,
      t.sparse.medianMs,
      dense,
      2,
      'dense attention over the uncompressed layer',
      `one query token, one layer (the step is per layer), timed in alternation; dense = the faster of core attention ` +
        `(${t.core.medianMs.toFixed(1)} ms, sparse is ${(t.sparse.medianMs / t.core.medianMs).toFixed(2)}× it) and the attention-ready layout ` +
        `(${t.ready.medianMs.toFixed(1)} ms); xkv G=4 r=${4 * ranks.rankK}/${4 * ranks.rankV}` +
        `; rebuilding the selected keys alone is ${keyRebuildVsDense(cache.layout, T, o.sparseBudget, 4 * ranks.rankK).toFixed(2)}× dense attention's multiply–adds` +
        (t.tfjsOps ? `; sparse step as WGSL kernels; the same step composed of tfjs ops: ${t.tfjsOps.medianMs.toFixed(2)} ms` : ''),
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
    if (cache) disposeCache(cache);
  }
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
