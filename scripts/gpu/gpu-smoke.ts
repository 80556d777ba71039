// GPU smoke test for the webgpu backend (bundled by scripts/gpu/bundle.sh, run on the H200): first
// the correctness checks that the unit tests run on wasm/cpu, repeated on the GPU backend (device
// float16 rounding bit for bit against the host; batched sparse decode against the per-head loop and
// against core attention at a full budget), then matmul / truncatedSvd timings. Exit 1 when a check fails.
import * as tf from '@tensorflow/tfjs-core';
import {
  applyRope,
  attention,
  createStrategy,
  deserializeCache,
  describeBackend,
  fromHalfBits,
  roundHalf,
  roundToHalfOnDevice,
  selectBackend,
  truncatedSvd,
  relativeFrobeniusError,
  wgslValidationErrors,
  releaseSharedRopeTables,
} from '@kvpack/core';
import '@kvpack/xkv';
import { attendWith } from '@kvpack/strategy-utils/internal';
import { syntheticLlamaCache } from '@kvpack/bench';

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

/** max |a − b| / max |b| of two tensors (disposes both; async reads: webgpu has no synchronous readback in Node). */
async function relMax(a: tf.Tensor, b: tf.Tensor): Promise<number> {
  const x = await a.data();
  const y = await b.data();
  tf.dispose([a, b]);
  let num = 0;
  let den = 0;
  for (let i = 0; i < y.length; i++) {
    num = Math.max(num, Math.abs(x[i] - y[i]));
    den = Math.max(den, Math.abs(y[i]));
  }
  return num / den;
}

/** The correctness checks; returns the number of failures. */
async function checks(): Promise<number> {
  let failed = 0;
  const report = (ok: boolean, line: string) => {
    console.log(`${ok ? 'PASS' : 'FAIL'} ${line}`);
    if (!ok) failed++;
  };
  // 1. Device float16 rounding = host rounding, bit for bit (every 3rd half value, midpoints, random floats).
  const xs: number[] = [0, 65504, 65519.99, 65520, -65520, 1e6, 2 ** -25, 1e-30];
  for (let h = 0; h < 0x7c00; h += 3) {
    const v = fromHalfBits(h);
    const mid = Math.fround((v + fromHalfBits(h + 1)) / 2);
    xs.push(v, -v, mid, -mid, mid * (1 + 2 ** -23), mid * (1 - 2 ** -23));
  }
  for (let i = 0; i < 100000; i++) xs.push(Math.fround((Math.random() - 0.5) * 2 ** (Math.random() * 60 - 30)));
  const x32 = Float32Array.from(xs);
  const want = roundHalf(x32);
  const t = tf.tensor1d(x32);
  const r = roundToHalfOnDevice(t);
  const got = await r.data();
  tf.dispose([t, r]);
  let bad = 0;
  for (let i = 0; i < x32.length; i++) if (got[i] !== want[i] && !(Number.isNaN(got[i]) && Number.isNaN(want[i]))) bad++;
  report(bad === 0, `device float16 rounding vs host: ${bad} of ${x32.length} values differ`);
  // 2. Sparse decode: batched (GPU default) vs per-head loop at a partial budget, and vs core attention at a full budget.
  const n0 = tf.memory().numTensors;
  const cache = await syntheticLlamaCache({ T: 4096, layers: 4, seed: 3 });
  const c = await createStrategy({ name: 'xkv', options: { layersPerGroup: 4, rankK: 64, rankV: 96, decode: 'sparse', sparse: { budget: 512 } } }).compress(cache);
  const q = tf.randomNormal([1, 32, 128], 0, 1, 'float32', 5) as tf.Tensor3D;
  const dLoop = await relMax(attendWith(c, 3, q, { heads: 'batched', kernels: 'tfjs' }), attendWith(c, 3, q, { heads: 'loop' }));
  report(dLoop < 1e-4, `sparse decode, batched tfjs ops vs per-head loop (budget 512 of 4096): max rel diff ${dLoop.toExponential(2)}`);
  if (tf.getBackend() === 'webgpu') {
    const dWgsl = await relMax(attendWith(c, 3, q, { kernels: 'wgsl' }), attendWith(c, 3, q, { heads: 'loop' }));
    report(dWgsl < 1e-4, `sparse decode, WGSL kernels vs per-head loop (budget 512 of 4096): max rel diff ${dWgsl.toExponential(2)}`);
  }
  const k = c.keys(3);
  const v = c.values(3);
  const dFull = await relMax(attendWith(c, 3, q, { heads: 'batched', budget: 4096 }), attention(q, k, v, 0));
  report(dFull < 1e-4, `sparse decode at a full budget vs core attention over keys()/values(): max rel diff ${dFull.toExponential(2)}`);
  // 3. The compression itself: the key error on this backend equals the wasm backend's (same cache, same seed).
  const backend = tf.getBackend();
  const keyError = async (): Promise<number> => {
    const cc = await syntheticLlamaCache({ T: 4096, layers: 4, seed: 3 });
    const z = await createStrategy({ name: 'xkv', options: { layersPerGroup: 4, rankK: 64, rankV: 96 } }).compress(cc);
    const exact = applyRope(cc.keys[3], cc.rope, { start: 0, count: 4096 });
    const rebuilt = z.keys(3);
    const e = await relativeFrobeniusError(exact, rebuilt);
    tf.dispose([exact, rebuilt]);
    z.dispose();
    tf.dispose([...cc.keys, ...cc.values]);
    return e;
  };
  const errHere = await keyError();
  tf.dispose([q, k, v, ...cache.keys, ...cache.values]);
  c.dispose();
  releaseSharedRopeTables(); // the process-wide device RoPE tables (kept between calls by design)
  const n1 = tf.memory().numTensors;
  await selectBackend('wasm');
  const errWasm = await keyError();
  await selectBackend(backend);
  report(Math.abs(errHere - errWasm) <= 0.02 * errWasm, `xkv G=4 r=256 key error on ${backend} ${errHere.toFixed(5)} vs wasm ${errWasm.toFixed(5)}`);
  // 4. NaN / Inf in a cache are named by the validation (a zero-vector product on this backend).
  for (const bad of [NaN, Infinity]) {
    const cc = await syntheticLlamaCache({ T: 256, layers: 4, seed: 4 });
    const poisoned = tf.tidy(() => tf.add(cc.values[2], tf.scatterND([[100, 3, 7]], [bad], [256, 8, 128]))) as tf.Tensor3D;
    const vals = [...cc.values];
    vals[2] = poisoned;
    let msg = '';
    try {
      (await createStrategy({ name: 'xkv', options: { layersPerGroup: 4, rankK: 8, rankV: 8 } }).compress({ ...cc, values: vals })).dispose();
    } catch (e) {
      msg = (e as Error).message;
    }
    report(/layer 2 values contain NaN or Inf/.test(msg), `a ${bad} in layer 2's values is named: "${msg}"`);
    tf.dispose([...cc.keys, ...cc.values, poisoned]);
  }
  // 5. Serialization: serializeAsync round-trips on this backend; serialize() either works or names serializeAsync.
  {
    const cc = await syntheticLlamaCache({ T: 512, layers: 4, seed: 6 });
    const z = await createStrategy({ name: 'xkv', options: { layersPerGroup: 4, rankK: 8, rankV: 12 } }).compress(cc);
    let syncMsg = 'ok';
    try {
      z.serialize();
    } catch (e) {
      syncMsg = (e as Error).message;
    }
    report(syncMsg === 'ok' || /serializeAsync/.test(syncMsg), `serialize() on ${backend}: ${syncMsg === 'ok' ? 'works' : `"${syncMsg.slice(0, 160)}"`}`);
    const bytes = await z.serializeAsync();
    const r = deserializeCache(bytes);
    const d = await relMax(r.keys(3), z.keys(3));
    report(r.byteSize() === z.byteSize() && d === 0, `serializeAsync → deserializeCache on ${backend}: ${bytes.length} bytes, keys max rel diff ${d}`);
    r.dispose();
    z.dispose();
    tf.dispose([...cc.keys, ...cc.values]);
  }
  report(n1 - n0 <= 0, `tensors after the checks: ${n1} (started at ${n0})`);
  if (tf.getBackend() === 'webgpu') {
    const bad = await wgslValidationErrors();
    report(bad.length === 0, `WGSL kernels that failed WebGPU validation: ${bad.length ? bad.join('; ') : 'none'}`);
  }
  return failed;
}

async function main(): Promise<void> {
const choice = await selectBackend(process.argv[2] ?? 'webgpu');
console.log(describeBackend(choice));
const failed = await checks();
if (process.argv.includes('--checks-only')) process.exit(failed ? 1 : 0);
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
if (failed) process.exit(1);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
