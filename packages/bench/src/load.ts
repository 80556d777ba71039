import { existsSync } from 'node:fs';
import { check } from '@kvpack/core';
import { LlamaModel, loadModel, loadTokenizer } from '@kvpack/models';
import type { BenchConfig, PromptSpec } from './config.js';
import type { BenchModel, BenchTokenizer } from './model.js';
import type { BenchPrompt } from './runner.js';

/** A loaded bench model with its tokenizer (when one was found). */
export interface LoadedBenchModel {
  model: BenchModel & { dispose(): void };
  tokenizer?: BenchTokenizer;
  format: string;
}

/**
 * Loads the config's model (llama2.c .bin, Hugging Face folder or GGUF, via `@kvpack/models`
 * `loadModel`) and its tokenizer (`tokenizer` from the config, else the one the model carries or
 * the llama2.c tokenizer beside it). Select the backend first.
 * @throws KvpackError('io' | 'corrupt' | 'truncated' | 'unsupported' | 'config') naming the file.
 */
export async function loadBenchModel(modelPath: string, tokenizerPath?: string): Promise<LoadedBenchModel> {
  const loaded = await loadModel(modelPath, tokenizerPath ? { tokenizer: tokenizerPath } : {});
  const model = new LlamaModel(loaded.weights);
  let tokenizer: BenchTokenizer | undefined = loaded.tokenizer;
  if (tokenizerPath && loaded.format !== 'llama2c') tokenizer = await loadTokenizer(tokenizerPath, { vocabSize: model.config.vocabSize });
  return { model, tokenizer, format: loaded.format };
}

/** True when the model path (and the tokenizer path, when given) exist. */
export function modelFilesPresent(cfg: Pick<BenchConfig, 'modelPath' | 'tokenizerPath'>): { ok: boolean; missing: string[] } {
  const missing = [cfg.modelPath, ...(cfg.tokenizerPath ? [cfg.tokenizerPath] : [])].filter((p) => !existsSync(p));
  return { ok: missing.length === 0, missing };
}

/**
 * Tokenizes the config's prompts. Text prompts get BOS (when `bos` and the tokenizer has one), are
 * cut to `maxTokens`, and lose their last `continuationTokens` tokens to the held-out continuation.
 * An explicit `prompt` + `continuation` pair is encoded as one text and split where the prompt's
 * own encoding ends (falling back to separate encodings when the tokens do not line up).
 * @throws KvpackError('config') when text prompts have no tokenizer or a prompt is too short.
 */
export function tokenizePrompts(
  specs: PromptSpec[],
  tokenizer: BenchTokenizer | undefined,
  opts: { bos: boolean; continuationTokens: number; maxPrompts?: number },
): BenchPrompt[] {
  const out: BenchPrompt[] = [];
  for (const [i, p] of specs.slice(0, opts.maxPrompts ?? specs.length).entries()) {
    const name = p.name ?? `prompt ${i}`;
    let ids: number[];
    let k: number;
    if ('ids' in p) {
      ids = [...p.ids];
      k = p.continuationTokens ?? opts.continuationTokens;
    } else {
      check(tokenizer, 'config', `prompts[${i}] is text, but the model has no tokenizer: set "tokenizer" in the config`);
      const bos = opts.bos && tokenizer.bosId !== undefined;
      if ('prompt' in p) {
        const whole = tokenizer.encode(p.prompt + p.continuation, { bos });
        const head = tokenizer.encode(p.prompt, { bos });
        const aligned = head.length < whole.length && head.every((t, j) => whole[j] === t);
        const cont = aligned ? whole.slice(head.length) : tokenizer.encode(p.continuation, { bos: false });
        out.push({ name, contextIds: head, continuationIds: cont });
        continue;
      }
      ids = tokenizer.encode(p.text, { bos });
      if (p.maxTokens) ids = ids.slice(0, p.maxTokens);
      k = p.continuationTokens ?? opts.continuationTokens;
    }
    check(ids.length >= k + 2, 'config', `prompts[${i}] (${name}) has ${ids.length} tokens; it needs at least ${k + 2} (2 context + ${k} held-out)`);
    out.push({ name, contextIds: ids.slice(0, ids.length - k), continuationIds: ids.slice(ids.length - k) });
  }
  return out;
}
