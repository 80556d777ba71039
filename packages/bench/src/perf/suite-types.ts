import type { KVCache, ModelLayout } from '@kvpack/core';
import type { PerfSetting } from './settings.js';
import type { RatioCheck, Timing } from './stats.js';

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
  /** Run the target checks: compress vs the matmul floor, sparse step vs dense attention (default true). */
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
  /**
   * Labels of settings ({@link PERF_SETTINGS}) whose compression is also timed on the compression
   * check's 4-layer cache, for the PyTorch peer's same-input comparison (default none).
   */
  checkBaselines?: string[];
}

/** What the compression check measured besides its ratio, for the PyTorch peer's checks. */
export interface CompressCheckDetail {
  /** Tokens T and features F of the group matrices [T, F], and the group rank. */
  tokens: number;
  features: number;
  rank: number;
  /** The xkv compression, K+V of the group (median ms). */
  compressMs: number;
  /** Relative Frobenius error of the group's reconstruction, ‖X̂ − X‖ / ‖X‖, per matrix (xk: pre-RoPE keys, xv: values). */
  relErr: { xk: number; xv: number };
  /** Median ms of compressing the same cache with each of {@link PerfSuiteOptions.checkBaselines}, by setting label. */
  baselineMs: Record<string, number>;
  /** GPU kernels (dispatches) and host readbacks of one compress of each baseline, on webgpu (absent elsewhere). */
  baselineKernels?: Record<string, { dispatches: number; readbacks: number }>;
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
  /** Bytes of the shared device RoPE tables after the decode steps (not part of any cache; 0 on wasm/cpu). */
  sharedRopeBytes: number;
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
  /** Details of the compression check (absent when it did not run). */
  compressDetail?: CompressCheckDetail;
  /** Checks that could not be computed, with the reason. */
  unavailable: { label: string; reason: string }[];
}
