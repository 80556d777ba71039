// GPU smoke test for the webgpu backend (bundled by ../shared/gpu/bundle.sh, run on the H200).
import * as tf from '@tensorflow/tfjs-core';
import { describeBackend, selectBackend, truncatedSvd, relativeFrobeniusError } from '../../../core/src/index';

async function sync(t: tf.Tensor): Promise<void> {
  const s = tf.sum(t);
  await s.data();
  s.dispose();
}

async function median(f: () => tf.Tensor | Promise<tf.Tensor>, reps = 5): Promise<number> {
  const ts: number[] = [];
  for (let i = 0; i < reps + 2; i++) {
    const t0 = performance.now();
    const r = await f();
    await sync(r);
    const dt = performance.now() - t0;
    r.dispose();
    if (i >= 2) ts.push(dt);
  }
  ts.sort((a, b) => a - b);
  return ts[Math.floor(ts.length / 2)];
}

async function main(): Promise<void> {
const choice = await selectBackend(process.argv[2] ?? 'webgpu');
console.log(describeBackend(choice));
for (const [m, k, n] of [[4096, 4096, 4096], [32768, 4096, 522], [8192, 4096, 522]]) {
  const a = tf.randomNormal([m, k]), b = tf.randomNormal([k, n]);
  const ms = await median(() => tf.matMul(a, b));
  console.log(`matmul ${m}x${k}x${n}: ${ms.toFixed(2)} ms, ${((2 * m * k * n) / ms / 1e9).toFixed(2)} TFLOP/s`);
  tf.dispose([a, b]);
}
const T = 32768, F = 4096;
const X = tf.tidy(() => tf.matMul(tf.randomNormal([T, 256], 0, 1, 'float32', 1), tf.randomNormal([256, F], 0, 1, 'float32', 2)).add(tf.randomNormal([T, F], 0, 1, 'float32', 3))) as tf.Tensor2D;
for (const q of [0, 1, 2]) {
  const ts: number[] = [];
  let err = 0;
  for (let i = 0; i < 4; i++) {
    const t0 = performance.now();
    const f = await truncatedSvd(X, { rank: 512, oversample: 8, powerIters: q, seed: i });
    await sync(f.coeffs);
    ts.push(performance.now() - t0);
    if (i === 3) {
      const A = tf.matMul(f.basis, f.coeffs);
      err = await relativeFrobeniusError(X, A);
      A.dispose();
    }
    tf.dispose([f.basis, f.coeffs]);
  }
  ts.shift();
  ts.sort((a, b) => a - b);
  console.log(`truncatedSvd [${T}x${F}] r=512 q=${q}: median ${ts[1].toFixed(1)} ms (runs ${ts.map((t) => t.toFixed(0)).join(', ')}), rel err ${err.toFixed(4)}`);
}
console.log('numTensors', tf.memory().numTensors);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
