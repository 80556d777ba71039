/**
 * Benchmark strategies on a KV cache dumped from PyTorch (see dump_kv.py): for each setting, the
 * measured compression ratio and the relative Frobenius error of the reconstructed post-RoPE keys
 * and values — no model needed in kvpack.
 *
 *   pnpm --filter @kvpack/examples exec tsx pytorch-dump/bench-dump.ts [DUMP.safetensors]
 *
 * Without an argument it first writes a demo dump from the embedded stories260K's prefill (post-RoPE
 * keys only, as a Hugging Face cache holds them), so it runs without PyTorch.
 */
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { compressionRatio, createStrategy, disposeKVCache, selectBackend, type StrategyConfig } from '@kvpack/core';
import { registerXkv } from '@kvpack/xkv';
import { registerBaselines } from '@kvpack/baselines';
import { LlamaModel, loadModel, readKVDump, writeKVDump } from '@kvpack/models';
import { reconstructionSums, relativeError } from '@kvpack/bench';

await selectBackend(process.env.KVPACK_BACKEND || 'wasm');
registerXkv();
registerBaselines();

let dumpPath = process.argv[2] ? resolve(process.argv[2]) : '';
if (!dumpPath) {
  const models = process.env.KVPACK_MODELS_DIR || resolve(import.meta.dirname, '../../models');
  const loaded = await loadModel(join(models, 'stories260K/stories260K_q80.bin'), { tokenizer: join(models, 'stories260K/tok512.bin') });
  const model = new LlamaModel(loaded.weights);
  const ids = loaded.tokenizer!.encode('Once upon a time, there was a little girl named Lily. '.repeat(6), { bos: true });
  const { logits, cache } = await model.prefill(ids, { logits: 'last' });
  dumpPath = join(tmpdir(), 'kvpack-demo.kvdump.safetensors');
  await writeKVDump(dumpPath, cache, { keys: 'post' });
  logits.dispose();
  disposeKVCache(cache);
  model.dispose();
  console.log(`wrote a demo dump (stories260K, ${ids.length} tokens, post-RoPE keys) to ${dumpPath}`);
}

const cache = await readKVDump(dumpPath); // post-RoPE keys are rotated back to pre-RoPE
const T = cache.keys[0].shape[0];
const { nLayers, nKvHeads, headDim } = cache.layout;
console.log(`dump: ${nLayers} layers, T = ${T}, H_kv = ${nKvHeads}, head_dim = ${headDim}\n`);

const settings: StrategyConfig[] = [
  { name: 'xkv', options: { layersPerGroup: Math.min(4, nLayers), rankK: Math.max(1, headDim / 2), rankV: Math.max(1, (3 * headDim) / 4) } },
  { name: 'svd', options: { rankK: Math.max(1, headDim / 2), rankV: Math.max(1, (3 * headDim) / 4) } },
  { name: 'kivi', options: { bits: 4, quantGroupSize: Math.min(32, headDim), residualLength: Math.min(32, T) } },
  { name: 'quant', options: { bits: 8 } },
];
console.log('| setting | ratio | key err (post-RoPE) | value err |\n| --- | ---: | ---: | ---: |');
for (const s of settings) {
  const compressed = await createStrategy(s).compress(cache);
  const ratio = compressionRatio(cache.layout, T, compressed.byteSize());
  const sums = await reconstructionSums(cache, compressed);
  compressed.dispose();
  const e = (x: number | undefined) => (x === undefined ? 'N/A' : x.toFixed(4));
  console.log(`| ${s.name} ${JSON.stringify(s.options)} | ${ratio.toFixed(2)}× | ${e(sums ? relativeError(sums.keys) : undefined)} | ${e(sums ? relativeError(sums.values) : undefined)} |`);
}
disposeKVCache(cache);
