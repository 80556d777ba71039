import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { check, type KVCache } from '@kvpack/core';
import { LlamaModel, loadModel } from '@kvpack/models';

/**
 * The models folder: env KVPACK_MODELS_DIR, else `<repo>/../shared/models` found by walking up from
 * the working directory to the folder holding `pnpm-workspace.yaml`.
 */
export function defaultModelsDir(cwd = process.cwd(), env: NodeJS.ProcessEnv = process.env): string {
  if (env.KVPACK_MODELS_DIR) return resolve(env.KVPACK_MODELS_DIR);
  let dir = resolve(cwd);
  for (;;) {
    if (existsSync(join(dir, 'pnpm-workspace.yaml'))) return resolve(dir, '..', 'shared', 'models');
    const up = resolve(dir, '..');
    if (up === dir) return resolve(cwd, '..', 'shared', 'models');
    dir = up;
  }
}

/** A real model whose prefill cache `kvpack bench structure` measures. */
export interface RealModelSpec {
  /** Folder name under the models folder. */
  name: string;
  /** Checkpoint path relative to the models folder (a file, or an HF folder). */
  checkpoint: string;
  /** Token ids of the prompt, read from files beside the model. */
  tokens(dir: string, maxTokens: number): number[];
}

/**
 * The two bundled models: stories260K (llama2.c; its float64 oracle's 257 greedy token ids, BOS
 * first) and rulermini-19m (Hugging Face; `eval_1024.jsonl` prompts' input_ids, concatenated up to
 * `maxTokens`).
 */
export const REAL_MODELS: readonly RealModelSpec[] = [
  {
    name: 'stories260K',
    checkpoint: 'stories260K/stories260K_q80.bin',
    tokens(dir) {
      const o = JSON.parse(readFileSync(join(dir, 'stories260K', 'oracle.json'), 'utf8')) as { greedy_ids: number[] };
      return o.greedy_ids;
    },
  },
  {
    name: 'rulermini-19m',
    checkpoint: 'rulermini-19m',
    tokens(dir, maxTokens) {
      const rows = readFileSync(join(dir, 'rulermini-19m', 'eval_1024.jsonl'), 'utf8')
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as { input_ids: number[] });
      const ids: number[] = [];
      for (const r of rows) {
        if (ids.length >= maxTokens) break;
        ids.push(...r.input_ids);
      }
      return ids.slice(0, maxTokens);
    },
  },
];

/** True when a model's checkpoint exists under `modelsDir`. */
export function realModelPresent(spec: RealModelSpec, modelsDir: string): boolean {
  return existsSync(join(modelsDir, spec.checkpoint));
}

/**
 * Runs a real model's prefill (exact attention, `LlamaModel.prefill`) over its prompt and returns
 * the KV cache (pre-RoPE keys, values [T, H_kv, d] per layer). Select the backend first. The caller
 * disposes the cache's tensors.
 * @throws KvpackError('io') when the model is absent; loader errors otherwise.
 */
export async function realModelCache(spec: RealModelSpec, modelsDir: string, maxTokens = 1024): Promise<{ cache: KVCache; tokens: number }> {
  check(realModelPresent(spec, modelsDir), 'io', `${spec.name}: ${join(modelsDir, spec.checkpoint)} not found (set KVPACK_MODELS_DIR)`);
  const loaded = await loadModel(join(modelsDir, spec.checkpoint));
  const model = new LlamaModel(loaded.weights);
  try {
    const ids = spec.tokens(modelsDir, Math.min(maxTokens, model.config.maxSeqLen)).slice(0, model.config.maxSeqLen);
    const { logits, cache } = await model.prefill(ids, { logits: 'last' });
    logits.dispose();
    return { cache, tokens: ids.length };
  } finally {
    model.dispose();
  }
}
