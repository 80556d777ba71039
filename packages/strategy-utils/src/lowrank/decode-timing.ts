import * as tf from '@tensorflow/tfjs-core';
import { check, isHostBackend, type CompressedCache } from '@kvpack/core';

/** Median timings of {@link decodeStepTimes}, in ms. */
export interface DecodeStepTimes {
  /** `keys(layer)`: post-RoPE keys of the layer, [N, H_kv, d]. */
  reconstructKeysMs: number;
  /** `values(layer)`. */
  reconstructValuesMs: number;
  /** One `attend(layer, q)` call (the cache's decode mode). */
  attendMs: number;
}

/**
 * Times reconstruction and one decode step of a compressed cache at one layer: the median over
 * `repeats` runs after one untimed run (which also builds any derived tensors). On wasm/cpu the
 * kernels run synchronously; on other backends each run waits for its result (`data()` of a 1-element
 * reduction). For the perf suite; not a test (no assertion). `q` is post-RoPE, [n, H, d].
 * @throws KvpackError('unsupported') when the cache has no `attend`.
 */
export async function decodeStepTimes(
  cache: CompressedCache,
  q: tf.Tensor3D,
  opts: { layer?: number; repeats?: number } = {},
): Promise<DecodeStepTimes> {
  const layer = opts.layer ?? 0;
  const reps = opts.repeats ?? 5;
  const warm = 1;
  check(typeof cache.attend === 'function', 'unsupported', `decodeStepTimes: ${cache.strategy} cache has no attend()`);
  const time = async (f: () => tf.Tensor): Promise<number> => {
    const ts: number[] = [];
    for (let i = 0; i < warm + reps; i++) {
      const t0 = performance.now();
      const r = f();
      if (!isHostBackend()) {
        const s = tf.sum(r);
        await s.data();
        s.dispose();
      }
      const dt = performance.now() - t0;
      r.dispose();
      if (i >= warm) ts.push(dt);
    }
    ts.sort((a, b) => a - b);
    return ts[Math.floor(ts.length / 2)];
  };
  return {
    reconstructKeysMs: await time(() => cache.keys(layer)),
    reconstructValuesMs: await time(() => cache.values(layer)),
    attendMs: await time(() => cache.attend!(layer, q)),
  };
}
