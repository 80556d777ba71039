// Writes tiny random Hugging Face model folders (config.json + model.safetensors) with the token ids
// and kvpack's logits for them (a prefill of 12 tokens, then 16 decode steps over a float32 dense
// cache), for scripts/crosscheck/hf_logits.py to compare with transformers on the GPU host:
//
//   node scripts/gpu/bundle.mjs scripts/crosscheck/write-models.ts /tmp/xc && node /tmp/xc/entry.cjs OUT_DIR   (here, after pnpm build)
//   python3 scripts/crosscheck/hf_logits.py OUT_DIR            (where transformers is installed)
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { denseStrategy, disposeKVCache, selectBackend } from '@kvpack/core';
import { LlamaModel, loadHfModel } from '@kvpack/models';
import { rng, tinyCheckpoint, writeHfDir, type TinySpec } from '../../packages/models/src/hf/testutil.js';

const base = { dim: 64, hiddenDim: 96, nHeads: 4, nKvHeads: 2, vocabSize: 128, maxSeqLen: 64 };
const MODELS: { name: string; spec: TinySpec }[] = [
  { name: 'qwen3', spec: { ...base, arch: 'Qwen3ForCausalLM', nLayers: 2, headDim: 24, ropeTheta: 1_000_000 } },
  { name: 'mistral-window', spec: { ...base, arch: 'MistralForCausalLM', nLayers: 2, extraConfig: { sliding_window: 5 } } },
  {
    name: 'qwen3-interleaved-window',
    spec: { ...base, arch: 'Qwen3ForCausalLM', nLayers: 3, headDim: 16, extraConfig: { use_sliding_window: true, sliding_window: 4, layer_types: ['sliding_attention', 'full_attention', 'sliding_attention'] } },
  },
  { name: 'llama', spec: { ...base, arch: 'LlamaForCausalLM', nLayers: 2 } },
];
const PREFILL = 12;
const DECODE = 16;

async function main(): Promise<void> {
  const out = process.argv[2];
  if (!out) throw new Error('usage: write-models.ts OUT_DIR');
  await selectBackend('cpu');
  for (const [i, m] of MODELS.entries()) {
    const dir = join(out, m.name);
    mkdirSync(dir, { recursive: true });
    writeHfDir(dir, tinyCheckpoint(m.spec, 100 + i));
    const r = rng(200 + i);
    const ids = Array.from({ length: PREFILL + DECODE }, () => Math.floor(r() * base.vocabSize));
    const model = new LlamaModel((await loadHfModel(dir)).weights);
    const { logits, cache } = await model.prefill(ids.slice(0, PREFILL));
    const dense = await denseStrategy({ storage: 'float32' }).compress(cache);
    const rows: Float32Array[] = [logits.dataSync() as Float32Array];
    for (let s = 0; s < DECODE; s++) {
      const o = model.decode([ids[PREFILL + s]], dense, PREFILL + s);
      rows.push(o.dataSync() as Float32Array);
      o.dispose();
    }
    const all = new Float32Array(rows.reduce((a, x) => a + x.length, 0));
    let off = 0;
    for (const x of rows) (all.set(x, off), (off += x.length));
    writeFileSync(join(dir, 'kvpack-logits.f32'), Buffer.from(all.buffer));
    writeFileSync(join(dir, 'ids.json'), JSON.stringify({ ids, prefill: PREFILL, decode: DECODE, vocab: base.vocabSize }));
    tf.dispose(logits);
    disposeKVCache(cache);
    dense.dispose();
    model.dispose();
    console.log(`wrote ${dir}`);
  }
}

void main().catch((e) => {
  console.error(e);
  process.exit(1);
});
