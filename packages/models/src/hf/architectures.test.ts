import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, denseStrategy, disposeKVCache, selectBackend, type CompressedCache } from '@kvpack/core';
import { LlamaModel } from '../model/index.js';
import { maxAbsDiff, refForward } from '../model/reference.testutil.js';
import { parseHfConfig } from './config.js';
import { loadHfModel } from './load.js';
import { refModelOf, rng, tinyCheckpoint, writeHfDir, type TinySpec } from './testutil.js';

let dir: string;
beforeAll(async () => {
  await selectBackend('wasm');
  dir = mkdtempSync(join(tmpdir(), 'kvpack-arch-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const base = { dim: 32, hiddenDim: 48, nHeads: 4, nKvHeads: 2, vocabSize: 64, maxSeqLen: 64 };
const CASES: { name: string; spec: TinySpec; windows?: (number | null)[] }[] = [
  { name: 'Qwen3: per-head q_norm / k_norm before RoPE, GQA, head_dim 12 ≠ D/H', spec: { ...base, arch: 'Qwen3ForCausalLM', nLayers: 2, headDim: 12 } },
  { name: 'Mistral: a 5-token sliding window on every layer', spec: { ...base, arch: 'MistralForCausalLM', nLayers: 2, extraConfig: { sliding_window: 5 } }, windows: [5, 5] },
  {
    name: 'Gemma-style interleaving (layer_types): windowed, full, windowed',
    spec: { ...base, arch: 'Qwen3ForCausalLM', nLayers: 3, headDim: 8, extraConfig: { sliding_window: 4, layer_types: ['sliding_attention', 'full_attention', 'sliding_attention'] } },
    windows: [4, null, 4],
  },
  {
    name: 'Qwen2: use_sliding_window from max_window_layers on',
    spec: { ...base, arch: 'Qwen2ForCausalLM', nLayers: 3, extraConfig: { use_sliding_window: true, sliding_window: 6, max_window_layers: 1 } },
    windows: [null, 6, 6],
  },
];

describe('Qwen3 and sliding-window models against a float64 forward', () => {
  CASES.forEach((c, i) => {
    it(`${c.name}: prefill and 16 decode steps within 1e-4`, async () => {
      const start = tf.memory().numTensors;
      const ckpt = tinyCheckpoint(c.spec, 10 + i);
      const d = join(dir, `case${i}`);
      writeHfDir(d, ckpt);
      const { weights, config } = await loadHfModel(d);
      expect(config.windows).toEqual(c.windows);
      expect(config.qkNorm === true).toBe(c.spec.arch === 'Qwen3ForCausalLM');
      const model = new LlamaModel(weights);
      const r = rng(77 + i);
      const ids = Array.from({ length: 28 }, () => Math.floor(r() * base.vocabSize));
      const want = refForward(refModelOf(ckpt, c.windows), ids);
      const P = 12;
      const { logits, cache } = await model.prefill(ids.slice(0, P));
      expect(cache.windows).toEqual(c.windows);
      expect(maxAbsDiff(logits.dataSync(), Float64Array.from(want.logits.slice(0, P).flatMap((row) => Array.from(row))))).toBeLessThan(1e-4);
      // Keys are cached after the per-head norm and before RoPE.
      expect(maxAbsDiff(cache.keys[1].dataSync(), Float64Array.from(want.keys[1].slice(0, P).flatMap((row) => Array.from(row))))).toBeLessThan(1e-4);
      const dense = await denseStrategy({ storage: 'float32' }).compress(cache);
      let worst = 0;
      for (let s = 0; s < 16; s++) {
        const out = model.decode([ids[P + s]], dense, P + s);
        worst = Math.max(worst, maxAbsDiff(out.dataSync(), want.logits[P + s]));
        out.dispose();
      }
      expect(worst).toBeLessThan(1e-4);
      logits.dispose();
      disposeKVCache(cache);
      dense.dispose();
      model.dispose();
      expect(tf.memory().numTensors).toBe(start);
    });
  });

  it('a windowed layer refuses a cache that dropped tokens, naming the strategy and the layer', async () => {
    const start = tf.memory().numTensors;
    const ckpt = tinyCheckpoint(CASES[1].spec, 3);
    const d = join(dir, 'evict');
    writeHfDir(d, ckpt);
    const model = new LlamaModel((await loadHfModel(d)).weights);
    const { logits, cache } = await model.prefill([1, 2, 3, 4, 5, 6, 7, 8]);
    const dense = await denseStrategy({ storage: 'float32' }).compress(cache);
    // The cache as an evicting strategy would leave it: fewer tokens held than positions decoded.
    const evicted = Object.assign(Object.create(dense) as CompressedCache, { strategy: 'evicting', tokenCount: () => 6 });
    let err: unknown;
    try {
      model.decode([9], evicted, 8);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(KvpackError);
    expect((err as KvpackError).code).toBe('unsupported');
    expect((err as Error).message).toMatch(/layer 0 uses a 5-token sliding window, but the evicting cache holds 6 of its 9 tokens/);
    logits.dispose();
    disposeKVCache(cache);
    dense.dispose();
    model.dispose();
    expect(tf.memory().numTensors).toBe(start);
  });

  it('names bad sliding-window settings and lists the supported architectures', () => {
    const cfg = (extra: Record<string, unknown>, arch = 'Qwen3ForCausalLM') => ({ ...tinyCheckpoint({ ...base, nLayers: 2, arch: arch as TinySpec['arch'] }).config, ...extra });
    const err = (c: Record<string, unknown>) => {
      try {
        parseHfConfig(c, 'config.json', { onWarning: () => {} });
      } catch (e) {
        expect(e).toBeInstanceOf(KvpackError);
        return (e as Error).message;
      }
      return 'no error';
    };
    expect(err(cfg({ sliding_window: 4, layer_types: ['sliding_attention'] }))).toMatch(/"layer_types" must list one entry per layer \(2\)/);
    expect(err(cfg({ sliding_window: 4, layer_types: ['sliding_attention', 'chunked_attention'] }))).toMatch(/layer_types\[1\] = "chunked_attention"/);
    expect(err(cfg({ layer_types: ['sliding_attention', 'full_attention'] }))).toMatch(/"sliding_window" is not set/);
    expect(err(cfg({ sliding_window: 0 }, 'MistralForCausalLM'))).toMatch(/"sliding_window" must be a positive integer/);
    expect(err({ ...cfg({}), architectures: ['GemmaForCausalLM'] })).toMatch(/not supported \(kvpack loads .*Qwen3ForCausalLM/);
    // Qwen2/3 window nothing unless use_sliding_window is on; Llama never does.
    expect(parseHfConfig(cfg({ sliding_window: 4, max_window_layers: 0 }), 'c', { onWarning: () => {} }).windows).toBeUndefined();
    expect(parseHfConfig(cfg({ sliding_window: 4 }, 'LlamaForCausalLM'), 'c', { onWarning: () => {} }).windows).toBeUndefined();
  });
});
