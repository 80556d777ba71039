import { basename } from 'node:path';
import { check, compressionRatio, createStrategy, disposeKVCache, type StrategyConfig } from '@kvpack/core';
import { readKVDump } from '@kvpack/models';
import { attentionOutputError, type AttentionOutputError } from './attention-error.js';

/** Attention-output error and measured ratio of one strategy setting on a KV dump. */
export interface DumpAttentionResult {
  /** The strategy config as given. */
  strategy: StrategyConfig;
  /** fp16 dense bytes / bytes held. */
  ratio: number;
  bytes: number;
  error: AttentionOutputError;
}

/**
 * Attention-output error of strategies on a KV dump (`@kvpack/models` `readKVDump`: safetensors
 * with per-layer keys, values and the **queries** a PyTorch model produced — see the models
 * package's README for the transformers snippet that writes one). Each strategy compresses the
 * dump's cache; {@link attentionOutputError} then compares attention over it with the exact cache,
 * using the dump's queries (the last n_q prompt tokens). Import @kvpack/xkv / @kvpack/baselines to
 * register strategies first.
 * @param count use only the last `count` query rows (default all)
 * @throws KvpackError('config') when the dump has no queries; read errors from `readKVDump` (naming
 *         the file); strategy errors as their `compress` throws them.
 */
export async function kvDumpAttentionErrors(path: string, strategies: StrategyConfig[], options: { count?: number } = {}): Promise<DumpAttentionResult[]> {
  const cache = await readKVDump(path);
  try {
    check(
      cache.queries && cache.queries.length > 0,
      'config',
      `${basename(path)}: the KV dump has no "layers.{i}.queries" tensors; the attention-output error needs the model's post-RoPE queries`,
    );
    const T = cache.keys[0].shape[0];
    const out: DumpAttentionResult[] = [];
    for (const s of strategies) {
      const c = await createStrategy(s).compress(cache);
      try {
        const bytes = c.byteSize();
        out.push({ strategy: s, bytes, ratio: compressionRatio(cache.layout, T, bytes), error: await attentionOutputError(cache, c, options) });
      } finally {
        c.dispose();
      }
    }
    return out;
  } finally {
    disposeKVCache(cache);
  }
}
