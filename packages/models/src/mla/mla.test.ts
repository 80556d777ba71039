import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, denseStrategy, selectBackend, type CompressedMlaCache } from '@kvpack/core';
import { writeHfDir } from '../hf/testutil.js';
import { DeepseekModel, loadDeepseekModel, parseDeepseekConfig, type MlaAttentionForm } from './index.js';
import { TINY, refDeepseekLogits, tinyDeepseekCheckpoint, type TinyDeepseekSpec } from './reference.testutil.js';

const root = mkdtempSync(join(tmpdir(), 'kvpack-mla-'));
beforeAll(async () => {
  await selectBackend('wasm');
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

const VARIANTS: Record<string, TinyDeepseekSpec> = {
  // DeepSeek-V2: q_lora_rank, softmax scores, group-limited greedy, routed weights scaled.
  'V2 (q_lora_rank, group_limited_greedy)': { modelType: 'deepseek_v2', qLoraRank: 16, topkMethod: 'group_limited_greedy', scoring: 'softmax', normTopkProb: false, routedScalingFactor: 2 },
  // DeepSeek-V2-Lite: no q_lora_rank, greedy, routed weights normalized.
  'V2-Lite (no q_lora_rank, greedy)': { modelType: 'deepseek_v2', qLoraRank: null, topkMethod: 'greedy', scoring: 'softmax', normTopkProb: true, routedScalingFactor: 1.5 },
  // DeepSeek-V3: sigmoid scores with e_score_correction_bias, noaux_tc, normalized then scaled.
  'V3 (sigmoid, noaux_tc)': { modelType: 'deepseek_v3', qLoraRank: 16, topkMethod: 'noaux_tc', scoring: 'sigmoid', normTopkProb: true, routedScalingFactor: 2.5 },
};

const PROMPT = [1, 17, 42, 5, 33, 8, 61, 20];
const CONT = [3, 50, 12, 44, 9, 27, 63, 0, 38, 14, 2, 55, 31, 7, 46, 22]; // 16 decode steps, teacher-forced

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>, bOffset = 0, n = a.length): number {
  let m = 0;
  for (let i = 0; i < n; i++) m = Math.max(m, Math.abs(a[i] - b[bOffset + i]));
  return m;
}

describe('DeepSeek MLA model vs an independent float64 reference', () => {
  for (const [name, spec] of Object.entries(VARIANTS)) {
    it(`${name}: prefill and 16 decode steps within 1e-4, absorbed and naive`, async () => {
      const ckpt = tinyDeepseekCheckpoint(spec);
      const dir = join(root, name.replace(/[^a-z0-9]+/gi, '_'));
      writeHfDir(dir, ckpt);
      const all = [...PROMPT, ...CONT];
      const ref = refDeepseekLogits(ckpt, all);
      // A routing decision this close could flip in float32: the seed must not produce one.
      expect(ref.margin).toBeGreaterThan(1e-4);
      const V = ckpt.config.vocab_size as number;
      const start = tf.memory().numTensors;
      const model = new DeepseekModel((await loadDeepseekModel(dir)).weights);
      for (const form of ['absorbed', 'naive'] as MlaAttentionForm[]) {
        model.attentionForm = form;
        const base = tf.memory().numTensors;
        const { logits, cache } = await model.prefill(PROMPT);
        expect(cache.kind).toBe('mla');
        expect(cache.latents[0].shape).toEqual([PROMPT.length, TINY.r]);
        expect(cache.ropeKeys[0].shape).toEqual([PROMPT.length, TINY.dr]);
        expect(maxDiff((await logits.data()) as Float32Array, ref.logits), `${form} prefill`).toBeLessThan(1e-4);
        logits.dispose();
        const c = (await denseStrategy({ storage: 'float32' }).compress(cache)) as CompressedMlaCache;
        tf.dispose([...cache.latents, ...cache.ropeKeys]);
        // 16 decode steps: the first 4 tokens in one call (causal among themselves), then one at a time.
        let worst = 0;
        for (let i = 0; i < CONT.length; ) {
          const n = i === 0 ? 4 : 1;
          const out = await model.decode(CONT.slice(i, i + n), c, PROMPT.length + i);
          expect(out.shape).toEqual([n, V]);
          worst = Math.max(worst, maxDiff((await out.data()) as Float32Array, ref.logits, (PROMPT.length + i) * V));
          out.dispose();
          i += n;
        }
        expect(c.tokenCount(0)).toBe(all.length);
        expect(worst, `${form} decode`).toBeLessThan(1e-4);
        c.dispose();
        expect(tf.memory().numTensors).toBe(base);
      }
      model.dispose();
      expect(tf.memory().numTensors).toBe(start);
    });
  }
});
