// Counts the webgpu compute dispatches (tfjs op kernels and kvpack's WGSL kernels, one Dawn dispatch
// each) and host readbacks of each baseline's compress and of one sparse decode step, on a
// Llama-3.1-8B-shaped synthetic cache (8 KV heads × head_dim 128). Dispatch counts depend on the
// shapes, not on the adapter, so a software adapter (lavapipe) gives the GPU's counts:
//
//   npx tsx scripts/gpu/count-dispatches.ts [--tokens 4096] [--layers 4] [--backend webgpu]
import * as tf from '@tensorflow/tfjs-core';
import { Command } from 'commander';
import { countWebGpuDispatches, createStrategy, disposeKVCache, selectBackend } from '@kvpack/core';
import { PERF_SETTINGS, decodeModes, syntheticLlamaCache } from '@kvpack/bench';

async function main(): Promise<void> {
  const a = new Command('count-dispatches')
    .option('--backend <name>', 'tfjs backend', 'webgpu')
    .option('--tokens <n>', 'prefill tokens', '4096')
    .option('--layers <n>', 'layers', '4')
    .option('--settings <labels>', 'perf settings to compress', 'kivi 2-bit,minicache,snapkv 2048,streamingllm 2048')
    .option('--sparse-budget <n>', 'budget of the sparse decode step', '2048')
    .parse(process.argv)
    .opts<{ backend: string; tokens: string; layers: string; settings: string; sparseBudget: string }>();
  await selectBackend(a.backend);
  const T = Number(a.tokens);
  const cache = await syntheticLlamaCache({ T, layers: Number(a.layers), seed: 3, observationWindow: 32 });
  const rows: string[] = [];
  for (const label of a.settings.split(',').map((s) => s.trim()).filter(Boolean)) {
    const s = PERF_SETTINGS.find((x) => x.label === label);
    if (!s) throw new Error(`unknown perf setting "${label}"`);
    // A budget within T (the label's budget where T allows).
    const options = 'budget' in s.options ? { ...s.options, budget: Math.min(Number(s.options.budget), Math.floor(T / 2)) } : s.options;
    const st = createStrategy({ name: s.name, options });
    (await st.compress(cache)).dispose(); // warm-up: pipelines compiled, validation scopes done
    const n0 = tf.memory().numTensors;
    const r = await countWebGpuDispatches(() => st.compress(cache));
    r.result.dispose();
    if (process.env.KVPACK_DISPATCH_NAMES) await histogram(() => st.compress(cache).then((c) => c.dispose()));
    rows.push(`${label}: compress of ${a.layers} layers, T = ${T}: ${r.dispatches} dispatches, ${r.readbacks} readbacks (tensors leaked: ${tf.memory().numTensors - n0})`);
    process.stderr.write(`${rows[rows.length - 1]}\n`);
  }
  const budget = Number(a.sparseBudget);
  if (budget < T) {
    const st = createStrategy({ name: 'xkv', options: { layersPerGroup: 4, rankK: 128, rankV: 192, decode: 'sparse', sparse: { budget } } });
    const c = await st.compress(cache);
    const mode = decodeModes(c, { sparseBudget: budget }).find((m) => m.mode === 'sparse');
    const q = tf.randomNormal([1, cache.layout.nHeads, cache.layout.headDim], 0, 1, 'float32', 5) as tf.Tensor3D;
    if (mode) {
      tf.dispose(mode.step(0, q));
      const r = await countWebGpuDispatches(() => mode.step(0, q));
      await (r.result as tf.Tensor).data();
      tf.dispose(r.result as tf.Tensor);
      rows.push(`xkv sparse decode step, budget ${budget}, one layer, T = ${T}: ${r.dispatches} dispatches, ${r.readbacks} readbacks`);
      process.stderr.write(`${rows[rows.length - 1]}\n`);
    }
    q.dispose();
    c.dispose();
  }
  disposeKVCache(cache);
  process.stdout.write(`${rows.join('\n')}\n`);
}

/** Dispatches by tfjs program class or kvpack kernel key, most frequent first (stderr). */
async function histogram(fn: () => Promise<void>): Promise<void> {
  const backend = tf.backend() as unknown as { runWebGPUProgram: (p: { shaderKey?: string; constructor: { name: string } }, ...a: unknown[]) => unknown };
  const run = backend.runWebGPUProgram;
  const counts = new Map<string, number>();
  backend.runWebGPUProgram = function (this: unknown, p, ...a) {
    const name = p.shaderKey?.startsWith('kvpack_') ? p.shaderKey : p.constructor.name;
    counts.set(name, (counts.get(name) ?? 0) + 1);
    return run.call(this, p, ...a);
  };
  try {
    await fn();
  } finally {
    delete (backend as { runWebGPUProgram?: unknown }).runWebGPUProgram;
  }
  process.stderr.write(`${[...counts].sort((x, y) => y[1] - x[1]).map(([k, v]) => `  ${k} ${v}`).join('\n')}\n`);
}

main().catch((e) => {
  process.stderr.write(`${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
