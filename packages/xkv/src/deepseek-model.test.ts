import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, headerBytes, mlaDenseBytes, selectBackend } from '@kvpack/core';
import { DeepseekModel, Session, loadDeepseekModel } from '@kvpack/models';
// Test-only writers of the models package: a tiny random DeepSeek-V2 checkpoint and its float64 forward.
import { writeHfDir } from '../../models/src/hf/testutil.js';
import { TINY, refDeepseekLogits, tinyDeepseekCheckpoint } from '../../models/src/mla/reference.testutil.js';
import './index.js';

/**
 * xKV on a real MLA model's cache: a tiny random DeepSeek-V2 (3 layers, latent r = 12, RoPE key 8,
 * one dense and two MoE layers) prefilled by @kvpack/models, compressed by xkv through a Session, then
 * decoded. At the full latent rank xKV is exact: the logits match the float64 reference forward.
 */
const root = mkdtempSync(join(tmpdir(), 'kvpack-xkv-deepseek-'));
const ckpt = tinyDeepseekCheckpoint({ modelType: 'deepseek_v2', qLoraRank: 16, topkMethod: 'group_limited_greedy', scoring: 'softmax', normTopkProb: false, routedScalingFactor: 2 });
const PROMPT = [1, 17, 42, 5, 33, 8, 61, 20, 3, 50, 12, 44];
const CONT = [9, 27, 63, 0, 38, 14, 2, 55];
let model: DeepseekModel;
let start: number;

beforeAll(async () => {
  await selectBackend('wasm');
  writeHfDir(root, ckpt);
  model = new DeepseekModel((await loadDeepseekModel(root)).weights);
  await model.fingerprint();
  start = tf.memory().numTensors;
});
afterAll(() => {
  expect(tf.memory().numTensors).toBe(start);
  model?.dispose();
  rmSync(root, { recursive: true, force: true });
});

describe('xkv on a DeepSeek MLA model', () => {
  it('full latent rank: decode logits equal the float64 reference within 1e-4', async () => {
    const T = PROMPT.length;
    const s = await Session.start(model, { strategy: 'xkv', options: { layersPerGroup: 3, exact: true, storage: 'float32', mla: { rank: T / 3 } } }); // per layer: group rank 3 · T/3 = T
    await s.prefill(PROMPT);
    await s.compress();
    expect(s.cache.strategy).toBe('xkv');
    const { data } = await s.step(CONT);
    const ref = refDeepseekLogits(ckpt, [...PROMPT, ...CONT]);
    const V = ckpt.config.vocab_size as number;
    let worst = 0;
    for (let i = 0; i < data.length; i++) worst = Math.max(worst, Math.abs(data[i] - ref.logits[T * V + i]));
    expect(worst).toBeLessThan(1e-4);
    s.dispose();
  });
  it('low latent rank: generate reports the ratio over latents and RoPE keys; bytes = the serialized payload', async () => {
    const strategy = createStrategy({ name: 'xkv', options: { layersPerGroup: 3, mla: { rank: 2 } } });
    const g = await model.generate(PROMPT, { maxNewTokens: 6, strategy, returnCache: true });
    expect(g.ids.length).toBe(6);
    const c = g.compressedCache!;
    const bytes = c.serialize();
    expect(g.cache.prefillByteSize).toBe(bytes.length - headerBytes(bytes) - 5 * TINY.L * (TINY.r + TINY.dr) * 4); // minus the 5 exact decode tokens
    expect(g.cache.compressionRatio).toBeCloseTo(mlaDenseBytes(model.layout, PROMPT.length) / g.cache.prefillByteSize, 12);
    c.dispose();
  });
});
