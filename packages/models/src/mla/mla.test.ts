import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, denseStrategy, selectBackend, type CompressedCache, type CompressedMlaCache } from '@kvpack/core';
import { tinyCheckpoint, writeHfDir } from '../hf/testutil.js';
import { loadHfModel } from '../hf/load.js';
import { LlamaModel } from '../model/llama.js';
import { parseHfConfig } from '../hf/config.js';
import { Session } from '../model/session.js';
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

describe('DeepSeek MLA model in a generation Session', () => {
  it('prefill → dense MLA cache → greedy decode follows the float64 argmax; a serialized cache resumes exactly', async () => {
    const ckpt = tinyDeepseekCheckpoint(VARIANTS['V2 (q_lora_rank, group_limited_greedy)']);
    const dir = join(root, 'session');
    writeHfDir(dir, ckpt);
    const start = tf.memory().numTensors;
    const model = new DeepseekModel((await loadDeepseekModel(dir)).weights);
    const s = await Session.start(model, { strategy: 'dense', options: { storage: 'float32' } });
    await s.prefill(PROMPT);
    const first = await s.greedy(5);
    expect(s.cache.kind).toBe('mla');
    expect(s.cache.model).toBe(await model.fingerprint());
    const bytes = s.cache.serialize();
    expect(bytes.length).toBeGreaterThan(s.cache.byteSize());
    const pending = [...s.pendingTokens];
    const rest = await s.greedy(5);
    const r = await Session.resume(model, bytes, { remainingTokens: pending });
    const again = await r.greedy(4);
    expect(again.ids).toEqual(rest.ids.slice(0, 4));
    r.dispose();
    // Every greedy token is the argmax of the float64 reference over the same sequence.
    const ids = [...first.ids, ...rest.ids];
    const seq = [...PROMPT, ...ids];
    const ref = refDeepseekLogits(ckpt, seq.slice(0, -1));
    const V = ckpt.config.vocab_size as number;
    for (let i = 0; i < ids.length; i++) {
      const row = Array.from(ref.logits.subarray((PROMPT.length - 1 + i) * V, (PROMPT.length + i) * V));
      const sorted = [...row].sort((a, b) => b - a);
      if (sorted[0] - sorted[1] > 1e-3) expect(ids[i]).toBe(row.indexOf(sorted[0]));
    }
    // LlamaModel-style generate / scoreContinuation on the MLA model.
    const g = await model.generate(PROMPT, { maxNewTokens: 6, strategy: denseStrategy({ storage: 'float32' }) });
    expect(g.ids).toEqual(ids.slice(0, 6));
    const perTokenBytes = TINY.L * (TINY.r + TINY.dr);
    expect(g.cache.prefillByteSize).toBe(perTokenBytes * PROMPT.length * 4);
    expect(g.cache.compressionRatio).toBe(0.5); // fp16 dense / float32 storage
    const sc = await model.scoreContinuation(PROMPT, CONT.slice(0, 6));
    const refSc = refDeepseekLogits(ckpt, [...PROMPT, ...CONT.slice(0, 5)]);
    let nll = 0;
    for (let i = 0; i < 6; i++) {
      const row = refSc.logits.subarray((PROMPT.length - 1 + i) * V, (PROMPT.length + i) * V);
      const m = Math.max(...row);
      nll += m + Math.log(row.reduce((a, v) => a + Math.exp(v - m), 0)) - row[CONT[i]];
    }
    expect(Math.abs(sc.meanNll - nll / 6)).toBeLessThan(1e-4);
    s.dispose();
    model.dispose();
    expect(tf.memory().numTensors).toBe(start);
  });
});

describe('DeepSeek loading errors', () => {
  const spec = VARIANTS['V3 (sigmoid, noaux_tc)'];
  const expectKvpack = async (p: Promise<unknown> | (() => unknown), code: string, fragment: RegExp | string) => {
    let err: unknown;
    try {
      await (typeof p === 'function' ? p() : p);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(KvpackError);
    expect((err as KvpackError).code).toBe(code);
    expect((err as Error).message).toMatch(fragment);
  };
  it('a DeepSeek config missing a field names it', async () => {
    for (const key of ['kv_lora_rank', 'qk_rope_head_dim', 'v_head_dim', 'moe_intermediate_size', 'n_group']) {
      const cfg = { ...tinyDeepseekCheckpoint(spec).config };
      delete cfg[key];
      await expectKvpack(() => parseDeepseekConfig(cfg), 'config', `lacks "${key}"`);
    }
  });
  it('an expert tensor of the wrong shape is named before any tensor is read', async () => {
    const ckpt = tinyDeepseekCheckpoint(spec);
    const name = 'model.layers.2.mlp.experts.5.up_proj.weight';
    ckpt.tensors.set(name, { shape: [TINY.Fe + 1, TINY.D], data: new Float32Array((TINY.Fe + 1) * TINY.D) });
    const dir = join(root, 'bad-expert');
    writeHfDir(dir, ckpt);
    const n = tf.memory().numTensors;
    await expectKvpack(loadDeepseekModel(dir), 'shape', `"${name}" has shape [${TINY.Fe + 1},${TINY.D}] but config.json implies [${TINY.Fe},${TINY.D}]`);
    expect(tf.memory().numTensors).toBe(n);
    ckpt.tensors.delete(name);
    writeHfDir(join(root, 'missing-expert'), ckpt);
    await expectKvpack(loadDeepseekModel(join(root, 'missing-expert')), 'corrupt', `missing tensor "${name}"`);
    expect(tf.memory().numTensors).toBe(n);
  });
  it('an unknown model_type lists the supported ones', async () => {
    const cfg = { ...tinyDeepseekCheckpoint(spec).config, model_type: 'gpt2', architectures: ['GPT2LMHeadModel'] };
    const list = /llama, mistral, qwen2, qwen3, deepseek_v2, deepseek_v3/;
    await expectKvpack(() => parseDeepseekConfig(cfg), 'unsupported', list);
    await expectKvpack(() => parseHfConfig(cfg), 'unsupported', list);
    // A DeepSeek config given to the Llama-family loader says which loader reads it.
    await expectKvpack(() => parseHfConfig({ ...cfg, model_type: 'deepseek_v2', architectures: [] }), 'unsupported', /loadDeepseekModel/);
  });
  it('decode refuses a per-head KV cache and a cache of another layout; a Llama-family model refuses an MLA cache', async () => {
    const dir = join(root, 'layout');
    writeHfDir(dir, tinyDeepseekCheckpoint(spec));
    const model = new DeepseekModel((await loadDeepseekModel(dir)).weights);
    const { logits, cache } = await model.prefill(PROMPT.slice(0, 3));
    logits.dispose();
    const spare = { ...cache, latents: cache.latents.map((t) => t.clone()), ropeKeys: cache.ropeKeys.map((t) => t.clone()), model: undefined };
    const c = (await denseStrategy({ storage: 'float32' }).compress({ ...cache, layout: { ...cache.layout, vHeadDim: 7 } })) as CompressedMlaCache;
    tf.dispose([...cache.latents, ...cache.ropeKeys]);
    const n = tf.memory().numTensors;
    await expectKvpack(model.decode([4], c, 3), 'layout', /vHeadDim/);
    expect(tf.memory().numTensors).toBe(n);
    c.dispose();
    const kv = { layout: { nLayers: TINY.L, nHeads: 2, nKvHeads: 1, headDim: 4 }, rope: { theta: 10000, layout: 'half' as const }, keys: [0, 1, 2].map(() => tf.ones([3, 1, 4]) as tf.Tensor3D), values: [0, 1, 2].map(() => tf.ones([3, 1, 4]) as tf.Tensor3D) };
    const perHead = await denseStrategy({ storage: 'float32' }).compress(kv);
    tf.dispose([...kv.keys, ...kv.values]);
    await expectKvpack(model.decode([4], perHead as unknown as CompressedMlaCache, 3), 'layout', /per-head KV cache/);
    perHead.dispose();
    // …and a Llama-family model refuses an MLA cache.
    writeHfDir(join(root, 'llama'), tinyCheckpoint({ dim: 16, hiddenDim: 24, nLayers: TINY.L, nHeads: 2, nKvHeads: 1, vocabSize: 64 }));
    const llama = new LlamaModel((await loadHfModel(join(root, 'llama'))).weights);
    const mla = (await denseStrategy({ storage: 'float32' }).compress(spare)) as CompressedMlaCache;
    tf.dispose([...spare.latents, ...spare.ropeKeys]);
    await expectKvpack(async () => llama.decode([4], mla as unknown as CompressedCache, 3), 'layout', /MLA latent cache/);
    mla.dispose();
    llama.dispose();
    model.dispose();
  });
});

describe('DeepSeek config variants', () => {
  it("transformers 5's rope_parameters read as rope_theta + rope_scaling; YaRN sets the softmax scale", () => {
    const cfg = tinyDeepseekCheckpoint(VARIANTS['V2 (q_lora_rank, group_limited_greedy)']).config;
    const a = parseDeepseekConfig(cfg);
    const { rope_theta, rope_scaling, ...rest } = cfg as Record<string, unknown>;
    const b = parseDeepseekConfig({ ...rest, rope_parameters: { rope_theta, rope_type: 'yarn', ...(rope_scaling as object), type: undefined } });
    expect(b.rope).toEqual(a.rope);
    expect(a.rope).toEqual({ theta: 10000, layout: 'interleaved', scaling: { type: 'yarn', factor: 4, originalMaxPositionEmbeddings: 64, betaFast: 32, betaSlow: 1, mscale: 0.9, mscaleAllDim: 0.8 } });
    expect(a.softmaxScale).toBeCloseTo((0.1 * 0.8 * Math.log(4) + 1) ** 2 / Math.sqrt(TINY.dn + TINY.dr), 14);
    expect(parseDeepseekConfig({ ...rest, rope_theta }).softmaxScale).toBe(1 / 4);
  });
  it('DeepSeek-V3 with rope_interleave false rotates half pairs (prefill vs the float64 reference)', async () => {
    const ckpt = tinyDeepseekCheckpoint({ ...VARIANTS['V3 (sigmoid, noaux_tc)'], ropeInterleave: false });
    const dir = join(root, 'v3-half');
    writeHfDir(dir, ckpt);
    const model = new DeepseekModel((await loadDeepseekModel(dir)).weights);
    expect(model.config.rope.layout).toBe('half');
    const { logits, cache } = await model.prefill(PROMPT, { observationWindow: 2 });
    expect(cache.queries?.[0].shape).toEqual([2, TINY.H, TINY.r + TINY.dr]);
    expect(maxDiff((await logits.data()) as Float32Array, refDeepseekLogits(ckpt, PROMPT).logits)).toBeLessThan(1e-4);
    tf.dispose([logits, ...cache.latents, ...cache.ropeKeys, ...cache.queries!]);
    model.dispose();
  });
});

describe('DeepSeek config.json property', () => {
  it('any value in any field gives a config or a KvpackError, never another error (seeded)', () => {
    const base = tinyDeepseekCheckpoint(VARIANTS['V3 (sigmoid, noaux_tc)']).config;
    const keys = Object.keys(base);
    const value = fc.oneof(fc.jsonValue(), fc.integer({ min: -3, max: 1 << 30 }), fc.constantFrom(null, undefined, 0, 1.5, -1, 'yarn', true));
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.constantFrom(...keys, 'rope_parameters'), value), { minLength: 1, maxLength: 3 }), (edits) => {
        const cfg: Record<string, unknown> = structuredClone(base);
        for (const [k, v] of edits) cfg[k] = v;
        try {
          const c = parseDeepseekConfig(cfg, 'config.json', { onWarning: () => {} });
          expect(c.nLayers).toBeGreaterThan(0);
        } catch (e) {
          if (!(e instanceof KvpackError)) throw e;
        }
      }),
      { seed: 16, numRuns: 400 },
    );
  });
});
