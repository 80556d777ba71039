// MiniCache's merge on a WebGPU adapter (a software one such as Mesa's lavapipe is enough; see
// scripts/webgpu-software.sh): SLERP, norms, retention and the float16 pack run there; the stored
// parts match the float64 host merge. Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { countWebGpuDispatches, validateKVCache, createStrategy, decodeContainer, decodeHalf, selectBackend, type ModelLayout } from '@kvpack/core';
import './index.js'; // registers the strategy
import { mergeLayerPair } from './oracle.js';
import { randomCache } from '../testing/testkit.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `minicache on webgpu (SKIPPED: no WebGPU adapter: ${unavailable})` : 'minicache on webgpu';
if (unavailable) console.warn(`[kvpack] ${title}`);

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  it('stored parts match the float64 merge: retained tokens and rows exactly, norms and directions to one float16 step (2^-19 on small direction components)', async () => {
    const layout: ModelLayout = { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 8 };
    const { nKvHeads: H, headDim: d } = layout;
    const T = 83;
    const gamma = 0.1;
    await selectBackend('wasm');
    const rc = randomCache(T, layout, 17);
    await selectBackend('webgpu');
    const n0 = tf.memory().numTensors;
    const { result: c, dispatches, readbacks } = await countWebGpuDispatches(() => createStrategy({ name: 'minicache', options: { gamma } }).compress(rc.cache)); // merges (2, 3)
    // The cache's validation (every compress), then fused kernels: per kind of the merged pair, row
    // stats, direction, two norms, top-k, two gathers and the positions' transpose (8); one pack per
    // exact layer's keys and values (4); one join of the retained positions for their single readback.
    const validation = (await countWebGpuDispatches(() => validateKVCache(rc.cache))).dispatches!;
    expect(dispatches).toBe(validation + 2 * 8 + 4 + 1);
    expect(readbacks).toBe(2); // the validation's flags, the retained positions
    const stored = decodeContainer(await c.serializeAsync());
    c.dispose();
    expect(tf.memory().numTensors).toBe(n0);
    for (const [kind, x] of [['k', rc.keys], ['v', rc.values]] as const) {
      const ref = mergeLayerPair(x[2], x[3], T, H, d, 0.6, gamma);
      const part = (name: string) => stored.get(`pair.2.${kind}.${name}`).data;
      expect(Array.from(part('idx') as Int32Array), `${kind} retained positions`).toEqual(Array.from(ref.idx));
      expect(Array.from(part('keep0') as Uint16Array)).toEqual(Array.from(ref.keep0));
      expect(Array.from(part('keep1') as Uint16Array)).toEqual(Array.from(ref.keep1));
      for (const name of ['dir', 'norm0', 'norm1'] as const) {
        const a = decodeHalf(part(name) as Uint16Array);
        const b = decodeHalf(ref[name]);
        expect(a.length).toBe(b.length);
        // WGSL's sin and atan2 are looser than libm's (a few float32 ulps): a direction component, of a unit
        // vector, may also be off by 2^-19 absolute where it is small.
        const floor = name === 'dir' ? 2 ** -19 : 2 ** -24;
        for (let i = 0; i < b.length; i++) expect(Math.abs(a[i] - b[i]), `${kind} ${name}[${i}]`).toBeLessThanOrEqual(Math.max(Math.abs(b[i]) * 2 ** -10, floor));
      }
    }
    await selectBackend('wasm');
    rc.dispose();
  });
});
