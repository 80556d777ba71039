import * as tf from '@tensorflow/tfjs-core';
import { applyRope, attention, gaussianMatrix, type KVCache, type ModelLayout } from '@kvpack/core';
import { attentionReadyLayer, denseDecodeStep, disposeAttentionReady } from './dense-step.js';
import { isSynchronousBackend, measurePeakMemory, timeOp, type Timing } from './stats.js';

// The dense baselines every perf figure is divided by, and how per-layer steps are timed.

/** A random post-RoPE decode query [1, H, d] with the keys' scale. */
export function decodeQuery(layout: ModelLayout, seed: number): tf.Tensor3D {
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
