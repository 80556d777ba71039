// GPU micro-benchmark of the range finder's products: tfjs's matMul against the tiled WGSL GEMM of
// packages/strategy-utils/src/lowrank/tall-skinny-wgsl.ts, at the shapes of one xKV group compression
// (G = 4 layers, T = 32K tokens, X = [T, F = 4096], sketch k = 512 + p columns), and the whole group
// compression (keys and values) with the old (tf.matMul) and the new (WGSL) products, timed in
// alternation, with its reconstruction error. Bundled like gpu-perf.ts:
//
//   bash scripts/gpu/bundle.sh scripts/gpu/gemm-bench.ts gemm-bundle        (here, after pnpm build)
//   bash gemm-bundle/run.sh --json /tmp/gemm.json [--peer scripts/gpu/xkv_torch.py]   (on the GPU host)
//   npx tsx scripts/gpu/gemm-bench.ts --small                                  (local smoke run, lavapipe)
//
// --peer runs the PyTorch peer (xkv_torch.py) on the group's matrices in the same run and prints
// torch.svd_lowrank's time and error next to ours. No top-level await (CJS bundle).
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { Command } from 'commander';
import { createStrategy, describeBackend, disposeKVCache, selectBackend, wgslValidationErrors, type CompressedCache, type KVCache } from '@kvpack/core';
import { LLAMA31_8B_LAYOUT, syntheticLlamaCache, timeInterleaved, timeOp, writeGroupMatrices, type PeerResult } from '@kvpack/bench';
import { GEMM_TILES, defaultSplitK, setRangeFinderProducts, wgslMatmul } from '@kvpack/strategy-utils/internal';

interface Row {
  product: string;
  kernel: string;
  M: number;
  N: number;
  K: number;
  medianMs: number;
  tflops: number;
  /** ‖C − C_tf‖_F / ‖C_tf‖_F against tf.matMul's result. */
  relDiff?: number;
}

async function relDiff(a: tf.Tensor, b: tf.Tensor): Promise<number> {
  const r = tf.tidy(() => tf.stack([tf.sum(tf.square(tf.sub(a, b))), tf.sum(tf.square(b))]));
  const [num, den] = await r.data();
  r.dispose();
  return Math.sqrt(num / Math.max(den, 1e-30));
}

/** ‖X − Σ basis·factor‖_F / ‖X‖_F over the group's layers (pre-RoPE keys or values). */
async function groupError(c: CompressedCache, cache: KVCache, kind: 'k' | 'v'): Promise<number> {
  const g = c as unknown as { basis(kind: string, group: number): tf.Tensor2D; factor(kind: string, layer: number): tf.Tensor2D };
  if (typeof g.basis !== 'function') return Number.NaN;
  const T = cache.keys[0].shape[0];
  const F = cache.layout.nKvHeads * cache.layout.headDim;
  let num = 0;
  let den = 0;
  const U = g.basis(kind, 0);
  for (let l = 0; l < cache.layout.nLayers; l++) {
    const B = g.factor(kind, l);
    const r = tf.tidy(() => {
      const X = tf.reshape((kind === 'k' ? cache.keys : cache.values)[l], [T, F]);
      return tf.stack([tf.sum(tf.square(tf.sub(X, tf.matMul(U, B)))), tf.sum(tf.square(X))]);
    });
    const [a, b] = await r.data();
    tf.dispose([r, B]);
    num += a;
    den += b;
  }
  U.dispose();
  return Math.sqrt(num / den);
}

async function main(): Promise<void> {
  const program = new Command('gemm-bench')
    .option('--backend <name>', 'tfjs backend', 'webgpu')
    .option('--small', 'local smoke run (lavapipe): T = 1024, F = 1024, k = 64, 1 timed run')
    .option('--tokens <n>', 'T (default 32768; --small 1024)')
    .option('--features <n>', 'F of the whole group (default 4096 = 4 layers × 8 KV heads × 128; --small 1024)')
    .option('--rank <n>', 'group rank r (default 512; --small 64)')
    .option('--oversample <n>', 'sketch columns k = r + p of the product benchmark', '0')
    .option('--tiles <list>', `WGSL tiles to time (default all: ${Object.keys(GEMM_TILES).join(',')})`)
    .option('--compress-tiles <list>', 'WGSL tiles timed in the group compression (default 128x64)', '128x64')
    .option('--splits <list>', 'extra split-K values timed for the Xᵀ·B products (default 1,4,16)', '1,4,16')
    .option('--reps <n>', 'timed runs (default 5; --small 1)')
    .option('--warmup <n>', 'warm-up runs (default 2; --small 1)')
    .option('--seed <n>', 'seed', '1')
    .option('--sketches <list>', 'test matrices of the timed group compressions (gaussian, sparse-sign)', 'gaussian')
    .option('--power-iters <list>', 'xkv powerIters q of the group compression, one timed row each (e.g. 1,2,3)', '1')
    .option('--compress-oversample <n>', 'xkv oversample p of the group compression (auto: 0 at rank 512)', 'auto')
    .option('--skip-products', 'skip the product table')
    .option('--skip-compress', 'skip the group compression')
    .option('--matrices <dir>', "write the group's matrices here for the peer (default a folder under the system temp dir)")
    .option('--peer <script>', 'run this PyTorch peer (xkv_torch.py) on the group matrices, in this run')
    .option('--python <exe>', 'python for the peer', 'python3')
    .option('--json <file>', 'write the results as JSON')
    .parse(process.argv);
  const a = program.opts<{
    backend: string;
    small?: boolean;
    tokens?: string;
    features?: string;
    rank?: string;
    oversample: string;
    tiles?: string;
    splits: string;
    compressTiles: string;
    reps?: string;
    warmup?: string;
    seed: string;
    powerIters: string;
    sketches: string;
    compressOversample: string;
    skipProducts?: boolean;
    skipCompress?: boolean;
    matrices?: string;
    peer?: string;
    python: string;
    json?: string;
  }>();
  const small = Boolean(a.small);
  const choice = await selectBackend(a.backend);
  console.log(describeBackend(choice));
  const T = Number(a.tokens ?? (small ? 1024 : 32768));
  const F = Number(a.features ?? (small ? 1024 : 4096));
  const r = Number(a.rank ?? (small ? 64 : 512));
  const k = r + Number(a.oversample);
  const reps = Number(a.reps ?? (small ? 1 : 5));
  const warmup = Number(a.warmup ?? (small ? 1 : 2));
  const seed = Number(a.seed);
  const tiles = (a.tiles ?? Object.keys(GEMM_TILES).join(',')).split(',').map((s) => s.trim());
  for (const t of tiles) if (!GEMM_TILES[t]) throw new Error(`unknown tile ${t}; choose from ${Object.keys(GEMM_TILES).join(', ')}`);
  const splits = a.splits
    .split(',')
    .map((s) => Number(s.trim()))
    .filter((s) => Number.isInteger(s) && s >= 1);
  const result: Record<string, unknown> = { kind: 'gemm-bench', backend: choice.name, T, F, rank: r, k, reps, warmup };
  const wgsl = choice.name === 'webgpu';

  // 1. The products, whole group X [T, F] and one layer's block X_i [T, F/4].
  if (!a.skipProducts) {
    const rows: Row[] = [];
    const X = tf.randomNormal([T, F], 0, 1, 'float32', seed) as tf.Tensor2D;
    const Xi = tf.randomNormal([T, F / 4], 0, 1, 'float32', seed + 5) as tf.Tensor2D;
    const O = tf.randomNormal([F, k], 0, 1, 'float32', seed + 1) as tf.Tensor2D;
    const Oi = tf.randomNormal([F / 4, k], 0, 1, 'float32', seed + 6) as tf.Tensor2D;
    const Q = tf.randomNormal([T, k], 0, 1 / Math.sqrt(T), 'float32', seed + 2) as tf.Tensor2D;
    const W = tf.randomNormal([k, k], 0, 1 / Math.sqrt(k), 'float32', seed + 3) as tf.Tensor2D;
    // [name, a, b, transposeA, M, N, K]
    const shapes: [string, tf.Tensor2D, tf.Tensor2D, boolean, number, number, number][] = [
      [`X·Ω = X·Z [${T}×${F}]·[${F}×${k}]`, X, O, false, T, k, F],
      [`Xᵀ·Q [${F}×${T}]·[${T}×${k}] (X read transposed)`, X, Q, true, F, k, T],
      [`Qᵀ·X [${k}×${T}]·[${T}×${F}] (Q read transposed)`, Q, X, true, k, F, T],
      [`block X_i·M_i [${T}×${F / 4}]·[${F / 4}×${k}]`, Xi, Oi, false, T, k, F / 4],
      [`block Yᵀ·X_i [${k}×${T}]·[${T}×${F / 4}]`, Q, Xi, true, k, F / 4, T],
      [`Gram QᵀQ [${k}×${T}]·[${T}×${k}]`, Q, Q, true, k, k, T],
      [`Q·W [${T}×${k}]·[${k}×${k}]`, Q, W, false, T, k, k],
      [`k×k [${k}]³`, W, W, false, k, k, k],
    ];
    console.log(`\n| product (${choice.name}) | kernel | median ms | TFLOP/s | × tf.matMul | rel. diff vs tf.matMul |`);
    console.log('| --- | --- | --- | --- | --- | --- |');
    for (const [name, A, B, tA, M, N, K] of shapes) {
      const flop = 2 * M * N * K;
      const ref = tf.matMul(A, B, tA, false);
      const kernels: [string, () => tf.Tensor][] = [['tf.matMul', () => tf.matMul(A, B, tA, false)]];
      if (wgsl) {
        for (const t of tiles) kernels.push([`wgsl ${t} (split ${defaultSplitK(M, N, K, GEMM_TILES[t])})`, () => wgslMatmul(A, B, tA, false, { tile: GEMM_TILES[t] })]);
        if (tA) for (const s of splits) if (s !== defaultSplitK(M, N, K)) kernels.push([`wgsl 128x64 split ${s}`, () => wgslMatmul(A, B, tA, false, { splitK: s })]);
      }
      let base = Number.NaN;
      for (const [kname, f] of kernels) {
        try {
          const t = await timeOp(f, { reps, warmup });
          if (kname === 'tf.matMul') base = t.medianMs;
          let d: number | undefined;
          if (kname !== 'tf.matMul') {
            const c = f();
            d = await relDiff(c, ref);
            c.dispose();
          }
          const row: Row = { product: name, kernel: kname, M, N, K, medianMs: t.medianMs, tflops: flop / t.medianMs / 1e9, relDiff: d };
          rows.push(row);
          console.log(`| ${name} | ${kname} | ${t.medianMs.toFixed(2)} | ${row.tflops.toPrecision(3)} | ${(base / t.medianMs).toFixed(2)} | ${d === undefined ? '' : d.toExponential(1)} |`);
        } catch (e) {
          console.log(`| ${name} | ${kname} | failed: ${(e as Error).message.split('\n')[0]} | | | |`);
        }
      }
      ref.dispose();
    }
    tf.dispose([X, Xi, O, Oi, Q, W]);
    // The four products of one power iteration (X·Ω, Xᵀ·Q, X·Z, Qᵀ·X) with each kernel's best.
    const best = (p: string, wg: boolean) => Math.min(...rows.filter((x) => x.product.startsWith(p) && (x.kernel === 'tf.matMul') !== wg).map((x) => x.medianMs));
    const four = (wg: boolean) => 2 * best('X·Ω', wg) + best('Xᵀ·Q', wg) + best('Qᵀ·X', wg);
    const tfMs = four(false);
    console.log(`\nfour products X·Ω + Xᵀ·Q + X·Z + Qᵀ·X (${(4 * 2 * T * F * k / 1e9).toFixed(0)} GFLOP): tf.matMul ${tfMs.toFixed(1)} ms` + (wgsl ? `, WGSL (best tile each) ${four(true).toFixed(1)} ms (speed-up ${(tfMs / four(true)).toFixed(2)}×)` : ''));
    console.log('  target: within 2× of the same products in PyTorch fp32 (≈ 45 ms on an H200 for the compression\'s products; torch reaches ~51 TFLOP/s on fp32 matmul there)');
    result.products = rows;
    result.fourProductsMs = { tfjs: tfMs, wgsl: wgsl ? four(true) : null };
  }

  // 2. Whole group compression (xkv, G = 4, keys and values), old vs new products, in alternation.
  if (!a.skipCompress) {
    const layout = small ? { ...LLAMA31_8B_LAYOUT, nKvHeads: Math.max(1, F / 4 / 128) } : LLAMA31_8B_LAYOUT;
    const cache = await syntheticLlamaCache({ T, layers: 4, layout, seed });
    const Fg = 4 * cache.layout.nKvHeads * cache.layout.headDim;
    const rankPerLayer = Math.max(1, Math.round(r / 4));
    const oversample = a.compressOversample === 'auto' ? 'auto' : Number(a.compressOversample);
    const qs = a.powerIters.split(',').map((x) => Number(x.trim()));
    const sketches = a.sketches.split(',').map((x) => x.trim());
    const strategyFor = (q: number, sketch: string) => createStrategy({ name: 'xkv', options: { layersPerGroup: 4, rankK: rankPerLayer, rankV: rankPerLayer, powerIters: q, oversample, sketch } });
    const run = (q: number, kind: 'wgsl' | 'tfjs', tile?: string, sketch = 'gaussian') => {
      const strategy = strategyFor(q, sketch);
      return async () => {
        setRangeFinderProducts(kind, tile);
        try {
          return await strategy.compress(cache);
        } finally {
          setRangeFinderProducts('tfjs');
        }
      };
    };
    const ops: Record<string, () => Promise<CompressedCache>> = {};
    for (const q of qs) {
      const sfx = qs.length > 1 || q !== 1 ? ` q=${q}` : '';
      ops[`tfjs${sfx}`] = run(q, 'tfjs');
      if (wgsl)
        for (const tile of a.compressTiles.split(',').map((x) => x.trim()))
          for (const sketch of sketches) ops[`wgsl ${tile}${sfx}${sketch === 'gaussian' ? '' : ` ${sketch}`}`] = run(q, 'wgsl', tile, sketch);
    }
    const baseName = Object.keys(ops)[0];
    const wgslNames = Object.keys(ops).filter((n) => n !== baseName);
    // Kernel dispatches of one compression (K+V): every tfjs and kvpack WGSL program goes through the
    // backend's runWebGPUProgram; on a GPU each costs far more than its arithmetic for the k×k work.
    const dispatches: Record<string, number> = {};
    if (wgsl) {
      const be = tf.backend() as unknown as { runWebGPUProgram: (...x: unknown[]) => unknown };
      const orig = be.runWebGPUProgram;
      for (const name of Object.keys(ops)) {
        let n = 0;
        const byKernel: Record<string, number> = {};
        be.runWebGPUProgram = function (this: unknown, ...x: unknown[]) {
          n++;
          const key = String((x[0] as { shaderKey?: string }).shaderKey ?? '?').replace(/_\d[\d_,-]*$/, '').slice(0, 40);
          byKernel[key] = (byKernel[key] ?? 0) + 1;
          return orig.apply(this, x);
        };
        try {
          (await ops[name]()).dispose();
        } finally {
          be.runWebGPUProgram = orig;
        }
        dispatches[name] = n;
        if (name === Object.keys(ops)[0])
          console.log(`dispatches of ${name} by kernel: ${Object.entries(byKernel).sort((x, y) => y[1] - x[1]).map(([k, c]) => `${k} ${c}`).join(', ')}`);
      }
      console.log(`
kernel dispatches per compression (K+V, one group): ${Object.entries(dispatches).map(([n, c]) => `${n} ${c}`).join(', ')}`);
    }
    const t = (await timeInterleaved(ops, { reps, warmup })) as Record<string, { medianMs: number; samplesMs: number[] }>;
    const errs: Record<string, { k: number; v: number }> = {};
    for (const name of Object.keys(ops)) {
      const c = await ops[name]();
      errs[name] = { k: await groupError(c, cache, 'k'), v: await groupError(c, cache, 'v') };
      c.dispose();
    }
    console.log(`\n| xkv compress K+V, one G=4 group [${T}, ${Fg}] r=${4 * rankPerLayer} (${choice.name}) | median ms | runs | rel. error K | rel. error V |`);
    console.log('| --- | --- | --- | --- | --- |');
    for (const name of Object.keys(ops))
      console.log(`| products: ${name.startsWith('tfjs') ? `tf.matMul${name.slice(4)}` : `${name} GEMM`} | ${t[name].medianMs.toFixed(1)} | ${t[name].samplesMs.map((x) => x.toFixed(0)).join(', ')} | ${errs[name].k.toFixed(5)} | ${errs[name].v.toFixed(5)} |`);
    for (const n of wgslNames)
      console.log(`${n} / ${baseName}: ${(t[n].medianMs / t[baseName].medianMs).toFixed(3)} (time), error K ${(errs[n].k / errs[baseName].k).toFixed(4)}×, V ${(errs[n].v / errs[baseName].v).toFixed(4)}× its`);
    result.compress = { T, F: Fg, rank: 4 * rankPerLayer, powerIters: qs, oversample, timings: t, relErr: errs, dispatches };
    if (a.peer) {
      const dir = a.matrices ?? join(tmpdir(), 'kvpack-gemm-peer');
      await writeGroupMatrices(cache, dir);
      const peerJson = join(dir, 'peer.json');
      console.log(`running the PyTorch peer: ${a.python} ${a.peer} --matrices ${dir}`);
      const p = spawnSync(a.python, [a.peer, '--matrices', dir, '--rank', String(4 * rankPerLayer), '--niters', '1,2', '--json', peerJson], { stdio: 'inherit' });
      if (p.status !== 0) console.log(`the peer failed (exit ${p.status}${p.error ? `, ${p.error.message}` : ''})`);
      else {
        const peer = JSON.parse(readFileSync(peerJson, 'utf8')) as PeerResult;
        result.peer = peer;
        const ours = Math.min(...Object.keys(ops).map((n) => t[n].medianMs));
        for (const n of ['1', '2']) {
          const ms = peer.svd_lowrank_kv_ms[n];
          const e = peer.matrices.map((m) => `${m.name} ${m.rel_err[n]?.toFixed(5)}`).join(', ');
          if (ms > 0) console.log(`torch.svd_lowrank(q=${peer.rank}, niter=${n}) K+V: ${ms.toFixed(1)} ms (rel. error ${e}); our fastest path is ${(ours / ms).toFixed(2)}× it`);
        }
        const exact = Object.fromEntries(peer.matrices.map((m) => [m.name, m.exact_rel_err ?? Number.NaN]));
        if (Number.isFinite(exact.xk) && Number.isFinite(exact.xv)) {
          for (const n of Object.keys(ops))
            console.log(`${n}: rel. error / exact truncated SVD's: K ${(errs[n].k / exact.xk).toFixed(4)}×, V ${(errs[n].v / exact.xv).toFixed(4)}× (target ≤ 1.02×); time / four torch products ${(t[n].medianMs / (peer.range_finder_products_kv_ms ?? Number.NaN)).toFixed(2)}× (target ≤ 2×)`);
        }
        console.log(`PyTorch xKV compress (svd_lowrank niter 2 + fp16 factors) K+V: ${peer.xkv_compress_kv_ms.toFixed(1)} ms (${peer.torch}, ${peer.device})`);
      }
    }
    disposeKVCache(cache);
  }
  const bad = await wgslValidationErrors();
  if (bad.length) console.log(`WGSL validation errors:\n${bad.join('\n')}`);
  result.validationErrors = bad;
  result.numTensors = tf.memory().numTensors;
  if (a.json) writeFileSync(a.json, `${JSON.stringify(result, null, 1)}\n`);
  console.log(JSON.stringify({ kind: 'gemm-bench', fourProductsMs: result.fourProductsMs ?? null, numTensors: result.numTensors }));
}

main().catch((e: unknown) => {
  console.error(`gemm-bench: ${(e as Error)?.stack ?? String(e)}`);
  process.exit(1);
});
