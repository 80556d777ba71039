import * as tf from '@tensorflow/tfjs-core';
import { check } from '@kvpack/core';
import { median as plainMedian } from '../metrics.js';

/**
 * Median of a non-empty list (the mean of the two middle values for an even count).
 * @throws KvpackError('shape') for an empty list or a non-finite value.
 */
export function median(xs: readonly number[]): number {
  check(xs.length > 0, 'shape', 'median of an empty list');
  check(
    xs.every((x) => Number.isFinite(x)),
    'nonfinite',
    () => `median: non-finite value in [${xs.join(', ')}]`,
  );
  return plainMedian(xs);
}

/** Timing summary of repeated runs, in ms. */
export interface Timing {
  /** Median of the timed runs (warm-up runs excluded). */
  medianMs: number;
  minMs: number;
  maxMs: number;
  /** Every timed run, in order. */
  samplesMs: number[];
  /** Warm-up runs done before the timed ones. */
  warmup: number;
}

/** Summarizes timed runs (ms). @throws KvpackError('shape') when there are none. */
export function summarize(samplesMs: readonly number[], warmup = 0): Timing {
  return {
    medianMs: median(samplesMs),
    minMs: Math.min(...samplesMs),
    maxMs: Math.max(...samplesMs),
    samplesMs: [...samplesMs],
    warmup,
  };
}

/** What a timed operation may return: tensors to wait for and dispose, or anything else. */
export type OpResult = tf.Tensor | tf.Tensor[] | { dispose(): void } | void | null | undefined;

function tensorsOf(r: OpResult): tf.Tensor[] {
  if (!r) return [];
  if (r instanceof tf.Tensor) return [r];
  if (Array.isArray(r)) return r.filter((t): t is tf.Tensor => t instanceof tf.Tensor);
  return [];
}

/** True where a kernel has finished when its op returns: wasm, cpu and tensorflow (tfjs-node executes eagerly). */
export function isSynchronousBackend(): boolean {
  const be = tf.getBackend();
  return be === 'wasm' || be === 'cpu' || be === 'tensorflow';
}

/**
 * Waits until the backend has finished computing `tensors`. On asynchronous backends (webgpu) this
 * reads back one element of each (which waits for the queue); on wasm, cpu and tensorflow kernels
 * run synchronously, so nothing is read.
 */
export async function syncTensors(tensors: readonly tf.Tensor[]): Promise<void> {
  if (isSynchronousBackend()) return;
  for (const t of tensors) {
    if (t.isDisposed || t.size === 0) continue;
    const one = tf.tidy(() => tf.slice(tf.reshape(t, [-1]), [0], [1]));
    await one.data();
    one.dispose();
  }
}

function release(r: OpResult): void {
  if (!r) return;
  if (r instanceof tf.Tensor) r.dispose();
  else if (Array.isArray(r)) tf.dispose(r);
  else if (typeof (r as { dispose?: unknown }).dispose === 'function') (r as { dispose(): void }).dispose();
}

/** Options of {@link timeOp}. */
export interface TimeOptions {
  /** Untimed runs first (JIT, shader compilation, allocator warm-up). Default 1. */
  warmup?: number;
  /** Timed runs; the median is reported. Default 3. */
  reps?: number;
  /**
   * Runs per timed sample (default 1): the operation is issued `batch` times back to back, the backend
   * is synchronized once, after the last, and the sample is the elapsed time ÷ batch. On an
   * asynchronous backend (webgpu) this is the per-run cost of queued work without one readback
   * latency per run (~1 ms through Dawn), as in a decode loop that reads back once per token, not once
   * per layer. On wasm/cpu it changes nothing but the sample count.
   */
  batch?: number;
}

/** Checks reps ≥ 1, warmup ≥ 0, batch ≥ 1 and fills the defaults. @throws KvpackError('config'). */
function timeOptions(opts: TimeOptions): { warmup: number; reps: number; batch: number } {
  const warmup = opts.warmup ?? 1;
  const reps = opts.reps ?? 3;
  const batch = opts.batch ?? 1;
  check(Number.isInteger(reps) && reps >= 1, 'config', `reps must be an integer ≥ 1, got ${reps}`);
  check(Number.isInteger(warmup) && warmup >= 0, 'config', `warmup must be an integer ≥ 0, got ${warmup}`);
  check(Number.isInteger(batch) && batch >= 1, 'config', `batch must be an integer ≥ 1, got ${batch}`);
  return { warmup, reps, batch };
}

/** One timed sample: `batch` runs, one synchronization after the last, ms per run; results disposed after the clock stops. */
/**
 * Waits until the backend has finished everything queued so far (webgpu: submits tfjs's pending
 * commands and waits for the device queue); a result that is not a tensor (a compressed cache)
 * leaves nothing to read back, so the clock must wait for the queue itself. No-op on synchronous
 * backends.
 */
export async function syncBackend(): Promise<void> {
  if (isSynchronousBackend()) return;
  const b = tf.backend() as unknown as {
    submitQueue?: () => void;
    endComputePassEncoder?: () => void;
    commandEncoder?: unknown;
    device?: { queue?: { onSubmittedWorkDone?: () => Promise<void> } };
  };
  if (typeof b.submitQueue === 'function' && typeof b.endComputePassEncoder === 'function' && typeof b.device?.queue?.onSubmittedWorkDone === 'function') {
    // As tfjs submits: the open compute pass ended first (a command buffer finished inside a pass is
    // invalid, and Dawn drops it with the work in it); nothing to submit when no encoder is open.
    if (b.commandEncoder) {
      b.endComputePassEncoder();
      b.submitQueue();
    }
    await b.device.queue.onSubmittedWorkDone();
    return;
  }
  const one = tf.zeros([1]);
  await one.data();
  one.dispose();
}

async function sample(op: () => OpResult | Promise<OpResult>, batch: number): Promise<number> {
  const results: OpResult[] = [];
  try {
    const t0 = performance.now();
    for (let j = 0; j < batch; j++) results.push(await op());
    await syncTensors(tensorsOf(results[batch - 1]));
    await syncBackend();
    return (performance.now() - t0) / batch;
  } finally {
    for (const r of results) release(r);
  }
}

/**
 * Times `op` `reps` times after `warmup` untimed runs and returns the median. Each run's clock stops
 * after the tensors it returns are computed ({@link syncTensors}); what it returns is then disposed
 * (tensors, arrays of tensors, or anything with `dispose()`, e.g. a compressed cache), outside the
 * timed span. With `batch` > 1 each sample is the mean of that many back-to-back runs (see {@link TimeOptions.batch}).
 * @throws KvpackError('config') for reps < 1, warmup < 0 or batch < 1.
 */
export async function timeOp(op: () => OpResult | Promise<OpResult>, opts: TimeOptions = {}): Promise<Timing> {
  const { warmup, reps, batch } = timeOptions(opts);
  const samples: number[] = [];
  for (let i = 0; i < warmup + reps; i++) {
    const dt = await sample(op, batch);
    if (i >= warmup) samples.push(dt);
  }
  return summarize(samples, warmup);
}

/**
 * Times several operations in alternation — round i runs each of them once, in order — so that a
 * ratio between them is not skewed by the machine's load drifting between two separate series.
 * The first `warmup` rounds are not recorded; each figure is the median of `reps` rounds. Results are
 * synchronized and disposed as in {@link timeOp}.
 * @throws KvpackError('config') for reps < 1, warmup < 0 or batch < 1.
 */
export async function timeInterleaved<K extends string>(ops: Record<K, () => OpResult | Promise<OpResult>>, opts: TimeOptions = {}): Promise<Record<K, Timing>> {
  const { warmup, reps, batch } = timeOptions(opts);
  const names = Object.keys(ops) as K[];
  const samples = Object.fromEntries(names.map((n) => [n, [] as number[]])) as Record<K, number[]>;
  for (let i = 0; i < warmup + reps; i++) {
    for (const n of names) {
      const dt = await sample(ops[n], batch);
      if (i >= warmup) samples[n].push(dt);
    }
  }
  return Object.fromEntries(names.map((n) => [n, summarize(samples[n], warmup)])) as Record<K, Timing>;
}

/** Tensor memory of one run of an operation, from tfjs's engine counters (bytes). */
export interface MemoryProfile {
  /** Highest tensor bytes held during the run minus the bytes held before it. */
  peakBytes: number;
  /** Tensor bytes still held after the run (what the result keeps) minus the bytes before. */
  retainedBytes: number;
}

/**
 * Peak of the engine's tensor-byte count at each kernel of a run, relative to the count before the
 * run (only tensors tfjs tracks: host arrays, e.g. of host-side strategies, are not counted). Uses
 * `tf.profile`, which records `tf.memory().numBytes` after every kernel; the run is not timed (tfjs
 * synchronizes every kernel while profiling). Peak = max(kernel snapshots, the count after the run)
 * − the count before.
 * @param op the operation; its result is passed to `keep` (and then disposed unless `keep` returns true)
 */
export async function measurePeakMemory<R extends OpResult>(
  op: () => R | Promise<R>,
  keep?: (r: R) => boolean | void,
): Promise<MemoryProfile & { result: R | null }> {
  const before = tf.memory().numBytes;
  let result: R | null = null;
  let info: Awaited<ReturnType<typeof tf.profile>>;
  try {
    info = await tf.profile(async () => {
      result = await op();
      return [] as tf.Tensor[];
    });
  } catch (e) {
    (tf.engine().state as unknown as { profiling: boolean }).profiling = false;
    throw e;
  }
  const after = tf.memory().numBytes;
  const snapshots = info.kernels.map((k) => k.totalBytesSnapshot);
  const peak = Math.max(after, before, ...snapshots);
  const prof: MemoryProfile = { peakBytes: peak - before, retainedBytes: after - before };
  const kept = result !== null && keep ? keep(result) === true : false;
  if (!kept) {
    release(result);
    result = null;
  }
  return { ...prof, result };
}

/** A measured figure against a baseline measured in the same run. */
export interface RatioCheck {
  /** What is compared, e.g. "CPU: compress K+V of one G = 4 group …". */
  label: string;
  /** The measured figure (ms). */
  valueMs: number;
  /** The baseline (ms). */
  baselineMs: number;
  /** value / baseline. */
  ratio: number;
  /** Pass when ratio ≤ target; null: reported without a target (INFO). */
  target: number | null;
  pass: boolean;
  /** One line: `PASS label = 2.41× baseline (target ≤ 3×)`. */
  line: string;
  /** Extra words on how the figures were measured. */
  note?: string;
  /** 'ratio' when value and baseline are not times (e.g. relative errors; `valueMs`/`baselineMs` then hold those values). */
  unit?: 'ratio';
}

/**
 * Ratio of a measured time (or, with unit 'ratio', another positive figure such as a relative
 * error) to its baseline and whether it meets a target (ratio ≤ target).
 * @throws KvpackError('nonfinite') unless both times are finite and the baseline is positive.
 */
export function ratioCheck(
  label: string,
  valueMs: number,
  baselineMs: number,
  target: number | null,
  baselineName: string,
  note?: string,
  unit: 'ms' | 'ratio' = 'ms',
): RatioCheck {
  const what = unit === 'ms' ? 'time' : 'value';
  check(Number.isFinite(valueMs) && valueMs >= 0, 'nonfinite', `${label}: measured ${what} ${valueMs} is not a finite non-negative number`);
  check(Number.isFinite(baselineMs) && baselineMs > 0, 'nonfinite', `${label}: baseline ${what} ${baselineMs} must be finite and positive`);
  const ratio = valueMs / baselineMs;
  const pass = target === null || ratio <= target;
  const fmt = unit === 'ms' ? fmtMs : (v: number) => v.toPrecision(4);
  const line =
    `${target === null ? 'INFO' : pass ? 'PASS' : 'FAIL'} ${label} = ${ratio.toFixed(unit === 'ms' ? 2 : 4)}× ${baselineName} ` +
    `(${fmt(valueMs)} vs ${fmt(baselineMs)}${target === null ? '' : `; target ≤ ${target}×`})`;
  return { label, valueMs, baselineMs, ratio, target, pass, line, ...(note ? { note } : {}), ...(unit === 'ms' ? {} : { unit }) };
}

/** "12.3 ms", "1.23 s". */
export function fmtMs(ms: number): string {
  if (!Number.isFinite(ms)) return 'n/a';
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  if (ms >= 100) return `${ms.toFixed(0)} ms`;
  if (ms >= 10) return `${ms.toFixed(1)} ms`;
  return `${ms.toFixed(2)} ms`;
}

/** "512 B", "1.5 KiB", "12.0 MiB", "1.50 GiB". */
export function fmtBytes(b: number): string {
  if (!Number.isFinite(b)) return 'n/a';
  const a = Math.abs(b);
  if (a >= 2 ** 30) return `${(b / 2 ** 30).toFixed(2)} GiB`;
  if (a >= 2 ** 20) return `${(b / 2 ** 20).toFixed(1)} MiB`;
  if (a >= 2 ** 10) return `${(b / 2 ** 10).toFixed(1)} KiB`;
  return `${b} B`;
}
