// Cross-check of the DeepSeek MLA forward against transformers (scripts/gpu/hf_logits.py):
//
//   1. KVPACK_MLA_HF_WRITE=gpu-bundle/mla-check pnpm vitest run packages/models/src/mla/hf-crosscheck.test.ts
//      writes the tiny model folders (config.json + model.safetensors, ~0.3 MB each) and tokens.json;
//   2. on a host with torch + transformers: python3 scripts/gpu/hf_logits.py gpu-bundle/mla-check --out OUT
//   3. KVPACK_MLA_HF_DIR=gpu-bundle/mla-check KVPACK_MLA_HF_LOGITS=OUT pnpm vitest run packages/models/src/mla/hf-crosscheck.test.ts
//      compares kvpack's logits (prefill, then one decode step per remaining id; absorbed and naive)
//      with transformers' within 1e-3.
import { existsSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { beforeAll, describe, expect, it } from 'vitest';
import { denseStrategy, selectBackend, type CompressedMlaCache } from '@kvpack/core';
import { writeHfDir } from '../hf/testutil.js';
import { DeepseekModel, loadDeepseekModel } from './index.js';
import { HF_CHECK_IDS, HF_CHECK_MODELS, HF_CHECK_PREFILL, refDeepseekLogits, tinyDeepseekCheckpoint } from './reference.testutil.js';

const WRITE = process.env.KVPACK_MLA_HF_WRITE;
const LOGITS = process.env.KVPACK_MLA_HF_LOGITS;
const DIR = process.env.KVPACK_MLA_HF_DIR ?? WRITE;

beforeAll(async () => {
  await selectBackend('wasm');
});

describe('DeepSeek MLA vs transformers', () => {
  it.skipIf(!WRITE)(`writes the tiny DeepSeek folders and tokens.json${WRITE ? '' : ' (SKIPPED: set KVPACK_MLA_HF_WRITE=<folder>)'}`, () => {
    mkdirSync(WRITE!, { recursive: true });
    for (const [name, spec] of Object.entries(HF_CHECK_MODELS)) {
      const ckpt = tinyDeepseekCheckpoint(spec);
      writeHfDir(join(WRITE!, name), ckpt);
      expect(refDeepseekLogits(ckpt, HF_CHECK_IDS).margin).toBeGreaterThan(1e-4);
    }
    writeFileSync(join(WRITE!, 'tokens.json'), JSON.stringify({ ids: HF_CHECK_IDS, prefill: HF_CHECK_PREFILL, models: Object.keys(HF_CHECK_MODELS) }));
  });

  const ready = !!LOGITS && !!DIR && existsSync(join(LOGITS, 'deepseek_v2.json'));
  it.skipIf(!ready)(`matches transformers' logits within 1e-3${ready ? '' : ' (SKIPPED: set KVPACK_MLA_HF_DIR and KVPACK_MLA_HF_LOGITS to the folders of hf_logits.py)'}`, async () => {
    const report: Record<string, unknown>[] = [];
    for (const name of Object.keys(HF_CHECK_MODELS)) {
      const meta = JSON.parse(readFileSync(join(LOGITS!, `${name}.json`), 'utf8'));
      const buf = readFileSync(join(LOGITS!, `${name}.logits.f32`));
      const hf = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
      const [T, V] = meta.shape as [number, number];
      expect(T).toBe(HF_CHECK_IDS.length);
      const ref = refDeepseekLogits(tinyDeepseekCheckpoint(HF_CHECK_MODELS[name]), HF_CHECK_IDS);
      let refVsHf = 0;
      for (let i = 0; i < T * V; i++) refVsHf = Math.max(refVsHf, Math.abs(ref.logits[i] - hf[i]));
      const model = new DeepseekModel((await loadDeepseekModel(join(DIR!, name))).weights);
      const row: Record<string, unknown> = { model: name, transformers: meta.transformers, dtype: meta.dtype, float64RefVsHf: refVsHf };
      for (const form of ['absorbed', 'naive'] as const) {
        model.attentionForm = form;
        const { logits, cache } = await model.prefill(HF_CHECK_IDS.slice(0, HF_CHECK_PREFILL));
        const ours = new Float32Array(T * V);
        ours.set((await logits.data()) as Float32Array);
        logits.dispose();
        const c = (await denseStrategy({ storage: 'float32' }).compress(cache)) as CompressedMlaCache;
        tf.dispose([...cache.latents, ...cache.ropeKeys]);
        for (let t = HF_CHECK_PREFILL; t < T; t++) {
          const out = await model.decode([HF_CHECK_IDS[t]], c, t);
          ours.set((await out.data()) as Float32Array, t * V);
          out.dispose();
        }
        c.dispose();
        let d = 0;
        for (let i = 0; i < T * V; i++) d = Math.max(d, Math.abs(ours[i] - hf[i]));
        row[form] = d;
      }
      model.dispose();
      report.push(row);
    }
    console.log(JSON.stringify(report, null, 1));
    for (const r of report) {
      expect(r.absorbed as number, `${r.model} absorbed`).toBeLessThan(1e-3);
      expect(r.naive as number, `${r.model} naive`).toBeLessThan(1e-3);
    }
  });
});
