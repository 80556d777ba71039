// Cross-check of the DeepSeek MLA forward against transformers (scripts/gpu/hf_logits.py). The
// logits of transformers (float64, eager attention and experts) are committed in
// transformers-logits/ with the SHA-256 of the model files they were computed from; every run writes
// the same tiny folders again, checks those hashes, and compares kvpack's logits (prefill, then one
// decode step per remaining id; absorbed and naive attention) with them.
//
// To regenerate after a change to the tiny checkpoints (reference.testutil.ts):
//   1. KVPACK_MLA_HF_WRITE=gpu-bundle/mla-check pnpm vitest run packages/models/src/mla/hf-crosscheck.test.ts
//   2. with torch + transformers: python3 scripts/gpu/hf_logits.py gpu-bundle/mla-check --out packages/models/src/mla/transformers-logits
// KVPACK_MLA_HF_LOGITS=OUT compares with another run of step 2 instead.
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs-core';
import { beforeAll, describe, expect, it } from 'vitest';
import { denseStrategy, selectBackend, type CompressedMlaCache } from '@kvpack/core';
import { writeHfDir } from '../hf/testutil.js';
import { DeepseekModel, loadDeepseekModel } from './index.js';
import { HF_CHECK_IDS, HF_CHECK_MODELS, HF_CHECK_PREFILL, refDeepseekLogits, tinyDeepseekCheckpoint } from './reference.testutil.js';

const WRITE = process.env.KVPACK_MLA_HF_WRITE;
const LOGITS = process.env.KVPACK_MLA_HF_LOGITS ?? join(dirname(fileURLToPath(import.meta.url)), 'transformers-logits');
const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

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

  it("matches transformers' logits (float64) within 1e-4, absorbed and naive attention", async () => {
    expect(existsSync(join(LOGITS, 'deepseek_v2.json')), `no transformers logits in ${LOGITS}`).toBe(true);
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-mla-hf-'));
    const report: Record<string, unknown>[] = [];
    try {
    for (const name of Object.keys(HF_CHECK_MODELS)) {
      const meta = JSON.parse(readFileSync(join(LOGITS, `${name}.json`), 'utf8'));
      const ckpt = tinyDeepseekCheckpoint(HF_CHECK_MODELS[name]);
      writeHfDir(join(dir, name), ckpt);
      // The logits belong to exactly these files (a changed tiny checkpoint needs new logits).
      for (const [file, hash] of Object.entries(meta.sha256 as Record<string, string>)) {
        expect(sha256(join(dir, name, file)), `${name}/${file} differs from the folder transformers ran; regenerate ${LOGITS} (see the top of this file)`).toBe(hash);
      }
      const buf = readFileSync(join(LOGITS, `${name}.logits.f32`));
      const hf = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
      const [T, V] = meta.shape as [number, number];
      expect(T).toBe(HF_CHECK_IDS.length);
      const ref = refDeepseekLogits(ckpt, HF_CHECK_IDS);
      let refVsHf = 0;
      for (let i = 0; i < T * V; i++) refVsHf = Math.max(refVsHf, Math.abs(ref.logits[i] - hf[i]));
      const model = new DeepseekModel((await loadDeepseekModel(join(dir, name))).weights);
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
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    console.log(JSON.stringify(report));
    for (const r of report) {
      // transformers computes RoPE angles in float32 even in a float64 model (~1e-6 on these logits).
      expect(r.float64RefVsHf as number, `${r.model} float64 reference`).toBeLessThan(1e-5);
      expect(r.absorbed as number, `${r.model} absorbed`).toBeLessThan(1e-4);
      expect(r.naive as number, `${r.model} naive`).toBeLessThan(1e-4);
    }
  });
});
