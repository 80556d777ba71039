// GPU time per kernel of one compression (and of xKV's sparse decode step), from WebGPU timestamp
// queries: where the wall time of a compress goes (kernels, readbacks, dispatch overhead). Needs an
// adapter with 'timestamp-query' (Dawn on the GPU host has it; lavapipe may not: times read 0).
// Bundled like gpu-perf.ts:
//
//   node scripts/gpu/bundle.mjs scripts/gpu/kernel-profile.ts gpu-bundle/profile   (here, after pnpm build)
//   KVPACK_DAWN_NODE=…/dawn.node node gpu-bundle/profile/entry.cjs --tokens 32768 --json OUT.json
//
// Each compression is run once untimed, timed three times (wall, the queue waited for), then once with
// a timestamp query around every dispatch (each then its own compute pass, so that run's wall time is
// not comparable; its kernel times are). No top-level await (CJS bundle).
import { writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import * as tf from '@tensorflow/tfjs-core';
import { Command } from 'commander';
import { applyRope, attention, createStrategy, describeBackend, nonFiniteProbe, disposeKVCache, selectBackend, validateKVCache, wgslValidationErrors, type CompressedCache } from '@kvpack/core';
import { PERF_SETTINGS, attentionReadyLayer, denseDecodeStep, disposeAttentionReady, decodeModes, median, syncBackend, syntheticLlamaCache } from '@kvpack/bench';

interface TimedBackend {
  activeTimers: { name: string; query: Promise<number> }[] | null;
  runWebGPUProgram: (program: { shaderKey?: string; constructor: { name: string } }, ...rest: unknown[]) => unknown;
  read: (...a: unknown[]) => Promise<unknown>;
}

interface Profile {
  label: string;
  wallMs: number[];
  medianWallMs: number;
  dispatches: number;
  readbacks: number;
  /** Host time spent awaiting readbacks in the profiled run, ms. */
  readbackWaitMs: number;
  gpuMs: number;
  kernels: { name: string; count: number; ms: number }[];
}

/** Runs fn with a timestamp query on every dispatch; kernel GPU times grouped by shader. */
async function kernelTimes<T>(fn: () => Promise<T>): Promise<{ result: T; dispatches: number; readbacks: number; readbackWaitMs: number; kernels: { name: string; count: number; ms: number }[]; gpuMs: number }> {
  const b = tf.backend() as unknown as TimedBackend;
  const names: string[] = [];
  const run = b.runWebGPUProgram;
  const read = b.read;
  let readbacks = 0;
  let readbackWaitMs = 0;
  b.runWebGPUProgram = function (this: unknown, program, ...rest) {
    names.push(program.shaderKey ?? program.constructor.name);
    return run.call(this, program, ...rest);
  };
  b.read = async function (this: unknown, ...a: unknown[]) {
    readbacks++;
    const t0 = performance.now();
    try {
      return await read.apply(this, a);
    } finally {
      readbackWaitMs += performance.now() - t0;
    }
  };
  b.activeTimers = [];
  let timers: { name: string; query: Promise<number> }[] = [];
  let result: T;
  try {
    result = await fn();
    await syncBackend();
  } finally {
    timers = b.activeTimers ?? [];
    b.activeTimers = null;
    delete (b as Partial<TimedBackend>).runWebGPUProgram;
    delete (b as Partial<TimedBackend>).read;
  }
  const ms = await Promise.all(timers.map((t) => t.query));
  const by = new Map<string, { count: number; ms: number }>();
  ms.forEach((m, i) => {
    const name = (names[i] ?? timers[i].name).slice(0, 90);
    const e = by.get(name) ?? { count: 0, ms: 0 };
    e.count++;
    e.ms += m;
    by.set(name, e);
  });
  const kernels = [...by].map(([name, e]) => ({ name, ...e })).sort((x, y) => y.ms - x.ms);
  return { result, dispatches: names.length, readbacks, readbackWaitMs, kernels, gpuMs: ms.reduce((a, c) => a + c, 0) };
}

function dispose(r: unknown): void {
  if (r instanceof tf.Tensor) r.dispose();
  else if (r && typeof (r as { dispose?: unknown }).dispose === 'function') (r as { dispose(): void }).dispose();
}

async function profileOp(label: string, op: () => Promise<unknown>, reps: number, log: (l: string) => void): Promise<Profile> {
  dispose(await op());
  await syncBackend();
  const wallMs: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    const r = await op();
    await syncBackend();
    wallMs.push(performance.now() - t0);
    dispose(r);
  }
  const k = await kernelTimes(op);
  dispose(k.result);
  const p: Profile = { label, wallMs, medianWallMs: median(wallMs), dispatches: k.dispatches, readbacks: k.readbacks, readbackWaitMs: k.readbackWaitMs, gpuMs: k.gpuMs, kernels: k.kernels };
  log(`\n## ${label}: wall ${p.medianWallMs.toFixed(2)} ms (median of ${reps}); ${p.dispatches} dispatches, GPU ${p.gpuMs.toFixed(2)} ms in kernels; ${p.readbacks} readbacks`);
  for (const e of p.kernels.slice(0, 14)) log(`  ${e.ms.toFixed(3).padStart(9)} ms  ×${String(e.count).padEnd(4)} ${e.name}`);
  return p;
}

async function main(): Promise<void> {
  const a = new Command()
    .option('--backend <name>', 'backend', 'webgpu')
    .option('--tokens <n>', 'tokens', (v) => Number(v), 32768)
    .option('--reps <n>', 'timed runs', (v) => Number(v), 3)
    .option('--settings <list>', 'perf settings to profile (labels, comma-separated)', 'dense fp16,dense fp32,kivi 2-bit,minicache,snapkv 2048,streamingllm 2048,xkv G=4 r=512/768')
    .option('--skip-sparse', 'no sparse decode step profile')
    .option('--sparse-loop <n>', 'also run n sparse decode steps back to back', (v) => Number(v), 0)
    .option('--cpu-profile <path>', 'write a V8 CPU profile of the back-to-back sparse steps (.cpuprofile)')
    .option('--submit-batch <n>', "tfjs-webgpu's WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE (dispatches per queue submit; tfjs default 15)", (v) => Number(v))
    .option('--json <path>', 'write the profiles as JSON')
    .parse()
    .opts<{ backend: string; tokens: number; reps: number; settings: string; skipSparse?: boolean; sparseLoop: number; cpuProfile?: string; submitBatch?: number; json?: string }>();
  const choice = await selectBackend(a.backend);
  if (a.submitBatch !== undefined) tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', a.submitBatch);
  const lines: string[] = [];
  const log = (l: string) => {
    lines.push(l);
    console.log(l);
  };
  log(`# kernel profile: ${describeBackend(choice)} T=${a.tokens}${a.submitBatch !== undefined ? `, ${a.submitBatch} dispatches per submit` : ''}`);
  const out: { micro: Record<string, number>; profiles: Profile[] } = { micro: {}, profiles: [] };

  // Fixed costs: one readback of a tiny tensor; an empty queue wait; 100 trivial dispatches.
  const tiny = tf.scalar(1);
  const lat: number[] = [];
  for (let i = 0; i < 21; i++) {
    const t0 = performance.now();
    const y = tf.add(tiny, 1);
    await y.data();
    y.dispose();
    lat.push(performance.now() - t0);
  }
  out.micro.readbackMs = median(lat.slice(1));
  const q: number[] = [];
  for (let i = 0; i < 21; i++) {
    const t0 = performance.now();
    await syncBackend();
    q.push(performance.now() - t0);
  }
  out.micro.emptyQueueWaitMs = median(q.slice(1));
  const d: number[] = [];
  for (let i = 0; i < 6; i++) {
    const t0 = performance.now();
    let y = tf.add(tiny, 0);
    for (let j = 0; j < 100; j++) {
      const z = tf.add(y, 1);
      y.dispose();
      y = z;
    }
    await syncBackend();
    y.dispose();
    d.push(performance.now() - t0);
  }
  out.micro.per100DispatchesMs = median(d.slice(1));
  tiny.dispose();
  log(`readback of a scalar ${out.micro.readbackMs.toFixed(3)} ms; empty queue wait ${out.micro.emptyQueueWaitMs.toFixed(3)} ms; 100 chained tiny dispatches ${out.micro.per100DispatchesMs.toFixed(2)} ms`);

  const cache = await syntheticLlamaCache({ T: a.tokens, layers: 4, seed: 1, observationWindow: 32 });
  try {
    out.profiles.push(await profileOp('validateKVCache (4 layers)', () => validateKVCache(cache), a.reps, log));
    // The earlier NaN/Inf probe (a product with a zero vector per tensor, then a sum), for comparison.
    const all = cache.keys.flatMap((k, l) => [k, cache.values[l]]);
    out.profiles.push(
      await profileOp('NaN/Inf probe by products (the earlier validation)', async () => {
        const f = tf.tidy(() => tf.stack(all.map(nonFiniteProbe)));
        await f.data();
        return f;
      }, a.reps, log),
    );
    for (const label of a.settings.split(',').map((s) => s.trim()).filter(Boolean)) {
      const s = PERF_SETTINGS.find((x) => x.label === label);
      if (!s) throw new Error(`unknown setting ${label}`);
      const st = createStrategy({ name: s.name, options: s.options });
      out.profiles.push(await profileOp(`${label} compress (4 layers)`, () => st.compress(cache), a.reps, log));
    }
    if (!a.skipSparse) {
      const st = createStrategy({ name: 'xkv', options: { layersPerGroup: 4, rankK: 128, rankV: 192, decode: 'sparse', sparse: { budget: 2048 } } });
      const c: CompressedCache = await st.compress(cache);
      const qy = tf.randomNormal([1, cache.layout.nHeads, cache.layout.headDim], 0, 1, 'float32', 17) as tf.Tensor3D;
      try {
        const mode = decodeModes(c, { sparseBudget: 2048 }).find((m) => m.mode === 'sparse');
        if (mode) out.profiles.push(await profileOp('xkv sparse decode step, budget 2048, one layer', async () => mode.step(3, qy), Math.max(a.reps, 5), log));
        if (mode && a.sparseLoop > 0) {
          const session = a.cpuProfile ? new Session() : null;
          if (session) {
            session.connect();
            await session.post('Profiler.enable');
            await session.post('Profiler.setSamplingInterval', { interval: 50 });
            await session.post('Profiler.start');
          }
          const t0 = performance.now();
          for (let s = 0; s < a.sparseLoop; s++) mode.step(3, qy).dispose();
          const issued = performance.now() - t0;
          await syncBackend();
          const total = performance.now() - t0;
          if (session) {
            const { profile } = await session.post('Profiler.stop');
            writeFileSync(a.cpuProfile!, JSON.stringify(profile));
            session.disconnect();
          }
          out.micro.sparseLoopMsPerStep = total / a.sparseLoop;
          log(`sparse decode steps back to back: ${(total / a.sparseLoop).toFixed(3)} ms per step (host issue ${(issued / a.sparseLoop).toFixed(3)} ms per step), ${a.sparseLoop} steps`);
        }
        const full = decodeModes(c, { sparseBudget: 2048 }).find((m) => m.mode === 'attend-full');
        if (full) out.profiles.push(await profileOp(`xkv decode step, ${full.label}, one layer`, async () => full.step(3, qy), Math.max(a.reps, 5), log));
        // Dense attention over the same uncompressed layer, the sparse step's baseline.
        const K = applyRope(cache.keys[3], cache.rope, { start: 0, count: a.tokens });
        const ready = attentionReadyLayer(K, cache.values[3]);
        try {
          out.profiles.push(await profileOp('dense attention, attention-ready layout, one layer', async () => denseDecodeStep(qy, ready), Math.max(a.reps, 5), log));
          out.profiles.push(await profileOp('dense attention, core attention, one layer', async () => attention(qy, K, cache.values[3], 0), Math.max(a.reps, 5), log));
        } finally {
          K.dispose();
          disposeAttentionReady(ready);
        }
      } finally {
        qy.dispose();
        c.dispose();
      }
    }
  } finally {
    disposeKVCache(cache);
  }
  const bad = await wgslValidationErrors();
  if (bad.length) log(`WGSL validation errors: ${bad.join('; ')}`);
  if (a.json) writeFileSync(a.json, JSON.stringify(out, null, 1));
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
