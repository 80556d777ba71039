// Error against time of core `truncatedSvd` settings (oversample p, power iterations q) on realistic
// matrices: the xkv G = 4 groups of rulermini-19m's and stories260K's real prefill caches, and one
// Llama-3.1-8B-shaped synthetic group (syntheticLlamaCache, X = [T, 4096], r = 512). The table in
// packages/xkv/README.md ("SVD defaults") comes from this script. Run (from the repo root, after pnpm build):
//
//   node scripts/gpu/bundle.mjs scripts/gpu/svd-defaults.ts bench-out/svd-defaults
//   node bench-out/svd-defaults/entry.cjs [--tokens 8192] [--reps 3] [--skip-synthetic] [--json out.json]
//
// Errors are relative Frobenius errors ‖X − U·B‖/‖X‖; "excess" is err/opt − 1 with opt the exact
// truncated-SVD error (float64 eigen-decomposition of XᵀX) for the real caches, and for the
// synthetic group the error of a heavy randomized reference (q = 4, p = 256), which is ≥ the optimum.
// Times are medians on the current backend (wasm by default), measured next to the two products
// X·Ω and Qᵀ·X at the same size ("×2mm" = time / (X·Ω + Qᵀ·X)).
import * as tf from '@tensorflow/tfjs-core';
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { gaussianMatrix, matmul, relativeFrobeniusError, selectBackend, symmetricEig, truncatedSvd, type KVCache } from '@kvpack/core';
import { REAL_MODELS, defaultModelsDir, median, realModelCache, realModelPresent, syntheticLlamaCache } from '@kvpack/bench';

interface Case {
  name: string;
  X: tf.Tensor2D;
  rank: number;
  /** Optimal (or reference) relative error at `rank`. */
  opt: number;
  optKind: 'exact' | 'reference';
}

interface Setting {
  oversample: number;
  powerIters: number;
}

const SETTINGS: Setting[] = [0, 8].flatMap((oversample) => [0, 0.5, 1, 1.5, 2].map((powerIters) => ({ oversample, powerIters })));

/** X_g = [T, n·H_kv·d] of layers `layers` (keys or values). */
function groupMatrix(cache: KVCache, kind: 'keys' | 'values', layers: number[]): tf.Tensor2D {
  const T = cache.keys[0].shape[0];
  const F = cache.layout.nKvHeads * cache.layout.headDim;
  return tf.tidy(() => tf.concat(layers.map((l) => tf.reshape(cache[kind][l], [T, F])), 1) as tf.Tensor2D);
}

/** Exact truncated-SVD error at rank r from the float64 eigenvalues of XᵀX (F ≤ ~1,024). */
async function exactError(X: tf.Tensor2D, r: number): Promise<number> {
  const [T, F] = X.shape;
  const x = (await X.data()) as Float32Array;
  const G = new Float64Array(F * F);
  for (let t = 0; t < T; t++) {
    const o = t * F;
    for (let i = 0; i < F; i++) {
      const xi = x[o + i];
      if (xi === 0) continue;
      const gi = i * F;
      for (let j = 0; j <= i; j++) G[gi + j] += xi * x[o + j];
    }
  }
  for (let i = 0; i < F; i++) for (let j = 0; j < i; j++) G[j * F + i] = G[i * F + j];
  const lam = symmetricEig(G, F).values.map((v) => Math.max(v, 0));
  const tot = lam.reduce((a, v) => a + v, 0);
  return Math.sqrt(lam.slice(r).reduce((a, v) => a + v, 0) / tot);
}

async function reconstructionError(X: tf.Tensor2D, s: Setting & { rank: number; seed?: number }): Promise<number> {
  const f = await truncatedSvd(X, { ...s, seed: s.seed ?? 1 });
  const A = matmul(f.basis, f.coeffs);
  const e = await relativeFrobeniusError(X, A);
  tf.dispose([A, f.basis, f.coeffs]);
  return e;
}

async function realCases(): Promise<Case[]> {
  const dir = defaultModelsDir();
  const out: Case[] = [];
  for (const spec of REAL_MODELS) {
    if (!realModelPresent(spec, dir)) {
      console.log(`(skipping ${spec.name}: not under ${dir})`);
      continue;
    }
    const { cache } = await realModelCache(spec, dir, 1024);
    const L = cache.layout.nLayers;
    const rPerLayer = 16;
    for (let g = 0; g * 4 < L; g++) {
      const layers = Array.from({ length: Math.min(4, L - g * 4) }, (_, i) => g * 4 + i);
      if (layers.length < 4) continue;
      for (const kind of ['keys', 'values'] as const) {
        const X = groupMatrix(cache, kind, layers);
        const rank = rPerLayer * layers.length;
        out.push({ name: `${spec.name} ${kind} group ${g} [${X.shape}]`, X, rank, opt: await exactError(X, rank), optKind: 'exact' });
      }
    }
    tf.dispose([...cache.keys, ...cache.values, ...(cache.queries ?? [])]);
  }
  return out;
}

async function syntheticCases(T: number): Promise<Case[]> {
  const cache = await syntheticLlamaCache({ T, layers: 4, seed: 2 });
  const out: Case[] = [];
  for (const kind of ['keys', 'values'] as const) {
    const X = groupMatrix(cache, kind, [0, 1, 2, 3]);
    const opt = await reconstructionError(X, { rank: 512, oversample: 256, powerIters: 4 });
    out.push({ name: `Llama-8B-shaped synthetic ${kind} [${X.shape}]`, X, rank: 512, opt, optKind: 'reference' });
  }
  tf.dispose([...cache.keys, ...cache.values]);
  return out;
}

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    options: {
      backend: { type: 'string', default: 'wasm' },
      reps: { type: 'string', default: '3' },
      tokens: { type: 'string', default: '8192' },
      json: { type: 'string', default: '' },
      'skip-synthetic': { type: 'boolean', default: false },
    },
  });
  const choice = await selectBackend(a.backend);
  const reps = Number(a.reps);
  const T = Number(a.tokens);
  console.log(`backend ${choice.name}; settings p ∈ {0, 8} × q ∈ {0, 0.5, 1, 1.5, 2}; median of ${reps} after a warm-up`);
  const cases = [...(await realCases()), ...(a['skip-synthetic'] ? [] : await syntheticCases(T))];
  const rows: Record<string, unknown>[] = [];
  for (const c of cases) {
    const [Tc, F] = c.X.shape;
    const omega = gaussianMatrix(F, c.rank, 11);
    const qt = gaussianMatrix(c.rank, Tc, 12);
    const time = (f: () => void): number => {
      const t0 = performance.now();
      f();
      return performance.now() - t0;
    };
    time(() => tf.matMul(c.X, omega).dispose());
    time(() => tf.matMul(qt, c.X).dispose());
    console.log(`\n${c.name}, rank ${c.rank}, ${c.optKind} optimum ${c.opt.toFixed(5)}`);
    console.log('| p | q | products | rel. error | excess | ms | ×2mm |');
    console.log('| --- | --- | --- | --- | --- | --- | --- |');
    for (const s of SETTINGS) {
      const err = await reconstructionError(c.X, { ...s, rank: c.rank });
      const ts: number[] = [];
      const ratio: number[] = [];
      for (let i = 0; i < reps; i++) {
        const mm = time(() => tf.matMul(c.X, omega).dispose()) + time(() => tf.matMul(qt, c.X).dispose());
        const t0 = performance.now();
        const f = await truncatedSvd(c.X, { ...s, rank: c.rank, seed: 1 });
        const dt = performance.now() - t0;
        tf.dispose([f.basis, f.coeffs]);
        ts.push(dt);
        ratio.push(dt / mm);
      }
      const row = { matrix: c.name, rank: c.rank, ...s, products: 2 * s.powerIters + 2, relErr: err, opt: c.opt, excess: err / c.opt - 1, ms: median(ts), vsTwoMatmuls: median(ratio) };
      rows.push(row);
      console.log(
        `| ${s.oversample} | ${s.powerIters} | ${row.products} | ${err.toFixed(5)} | ${(100 * row.excess).toFixed(1)}% | ${row.ms.toFixed(0)} | ${row.vsTwoMatmuls.toFixed(2)} |`,
      );
    }
    tf.dispose([omega, qt, c.X]);
  }
  const json = a.json;
  if (json) writeFileSync(json, JSON.stringify({ backend: choice.name, reps, rows }, null, 1));
  console.log(JSON.stringify({ kind: 'svd-defaults', backend: choice.name, rows }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
