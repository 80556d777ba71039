// Times KIVI compression of a synthetic cache on one backend: the backend path (the `kivi`
// strategy's compress: quantization and packing in tfjs ops / WGSL) against the former host path
// (read back, quantize in float64 JavaScript with ./host-oracle.ts, pack, upload), same inputs, same
// run. Not a test. Run from the repo root:
//   node node_modules/.pnpm/tsx@*/node_modules/tsx/dist/cli.mjs packages/baselines/src/kivi/compress-timing.ts \
//     [backend=wasm] [T=4096] [H_kv=8] [d=128] [layers=4] [bits=2]
// or, on a GPU host, bundled like the scripts/gpu entries (scripts/gpu/bundle.sh THIS_FILE OUTDIR).
import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, applyRope, createStrategy, encodeHalf, selectBackend, type KVCache } from '@kvpack/core';
import { CodesTensor, packCodes } from '@kvpack/strategy-utils';
import '../index.js';
import { quantizeKeysPerChannel, quantizeValuesPerToken } from './host-oracle.js';

const [backend = 'wasm', Ts = '4096', Hs = '8', ds = '128', Ls = '4', bs = '2'] = process.argv.slice(2);
const [T, H, d, L, bits] = [Ts, Hs, ds, Ls, bs].map(Number) as [number, number, number, number, 2 | 4];
const options = { bits, quantGroupSize: 32, residualLength: 128 };

/** The former compress: host quantization, uploaded packed (what it held is disposed at once). */
async function hostCompress(cache: KVCache): Promise<void> {
  const { quantGroupSize: g, residualLength: R } = options;
  const held: { dispose(): void }[] = [];
  for (let l = 0; l < L; l++) {
    const post = applyRope(cache.keys[l], cache.rope, { start: 0, count: T });
    const kData = (await post.data()) as Float32Array;
    post.dispose();
    const vData = (await cache.values[l].data()) as Float32Array;
    const nk = T - (T % R);
    const nv = Math.max(0, T - R);
    const kb = quantizeKeysPerChannel(kData.subarray(0, nk * H * d), nk, H, d, g, bits);
    const vb = quantizeValuesPerToken(vData.subarray(0, nv * H * d), nv, H, d, g, bits);
    for (const [b, n, shape] of [[kb, nk, [nk / g, H, d]], [vb, nv, [nv, H, d / g]]] as const) {
      held.push(CodesTensor.fromBytes(packCodes(b.codes, bits), bits, n * H * d), HalfTensor.fromBits(b.scale, [...shape]), HalfTensor.fromBits(b.min, [...shape]));
    }
    if (nk < T) held.push(HalfTensor.fromBits(encodeHalf(kData.subarray(nk * H * d)), [T - nk, H, d]));
    held.push(HalfTensor.fromBits(encodeHalf(vData.subarray(nv * H * d)), [T - nv, H, d]));
  }
  held.forEach((h) => h.dispose());
}

async function backendCompress(cache: KVCache): Promise<void> {
  // compress awaits one readback at its end (the range check), so the device work is done when it returns.
  const c = await createStrategy({ name: 'kivi', options }).compress(cache);
  c.dispose();
}

async function time(f: () => Promise<void>, reps = 3): Promise<number> {
  await f();
  const ms: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    await f();
    ms.push(performance.now() - t0);
  }
  return ms.sort((a, b) => a - b)[Math.floor(reps / 2)];
}

async function main(): Promise<void> {
  await selectBackend(backend);
  const cache: KVCache = {
    layout: { nLayers: L, nHeads: H * 4, nKvHeads: H, headDim: d },
    rope: { theta: 10000, layout: 'half' },
    keys: Array.from({ length: L }, (_, l) => tf.randomNormal([T, H, d], 0, 1, 'float32', 1 + l) as tf.Tensor3D),
    values: Array.from({ length: L }, (_, l) => tf.randomNormal([T, H, d], 0, 1, 'float32', 100 + l) as tf.Tensor3D),
  };
  const host = await time(() => hostCompress(cache));
  const dev = await time(() => backendCompress(cache));
  console.log(`kivi compress on ${tf.getBackend()}, [T=${T}, H_kv=${H}, d=${d}] × ${L} layers, ${bits}-bit, g=32, R=128 (median of 3 after a warm-up):`);
  console.log(`  host (former): ${host.toFixed(0)} ms   backend: ${dev.toFixed(0)} ms   host ÷ backend: ${(host / dev).toFixed(2)}×`);
  tf.dispose([...cache.keys, ...cache.values]);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
