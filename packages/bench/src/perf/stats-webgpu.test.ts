// syncBackend on a WebGPU adapter (lavapipe is enough, see scripts/webgpu-software.sh): waiting for
// the queue must submit the pending work as tfjs does, not drop it. Skipped, saying why, without an adapter.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { selectBackend } from '@kvpack/core';
import { syncBackend } from './stats.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `syncBackend on webgpu (SKIPPED: no WebGPU adapter: ${unavailable})` : 'syncBackend on webgpu';
if (unavailable) console.warn(`[kvpack] ${title}`);

describe.skipIf(unavailable !== null)(title, () => {
  it('submits the queued kernels (an open compute pass included) and leaves their results intact', async () => {
    const start = tf.memory().numTensors;
    const device = (tf.backend() as unknown as { device: { pushErrorScope(f: string): void; popErrorScope(): Promise<{ message: string } | null> } }).device;
    const m = 24;
    const a = Array.from({ length: m * m }, (_, i) => ((i * 7) % 13) - 6);
    const b = Array.from({ length: m * m }, (_, i) => ((i * 5) % 11) - 5);
    const A = tf.tensor2d(a, [m, m]);
    const B = tf.tensor2d(b, [m, m]);
    device.pushErrorScope('validation');
    // Two products queued with no readback: tfjs leaves its compute pass open between them.
    const C = tf.matMul(A, B);
    const D = tf.add(C, 1);
    await syncBackend();
    await syncBackend(); // nothing queued: no submit
    expect(await device.popErrorScope()).toBeNull();
    const got = (await D.data()) as Float32Array;
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < m; j++) {
        let s = 1;
        for (let k = 0; k < m; k++) s += a[i * m + k] * b[k * m + j];
        expect(got[i * m + j]).toBe(s); // small integers: exact in float32
      }
    }
    tf.dispose([A, B, C, D]);
    expect(tf.memory().numTensors).toBe(start);
  });
});
