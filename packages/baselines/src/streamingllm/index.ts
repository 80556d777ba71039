import { MAX_TOKENS, atMost } from '@kvpack/core';
import { budgetOption, budgetOrTarget, defineEvictionStrategy, targetRatioOption } from '@kvpack/strategy-utils';
import { z } from 'zod';

const tokens = atMost(MAX_TOKENS, "tokens; 2^20 tokens of one layer's keys already fill the wasm heap");

/** Budget when neither budget nor targetRatio is given. */
const DEFAULT_BUDGET = 256;

/** Options of the `streamingllm` strategy. */
export const StreamingLlmOptionsSchema = z
  .strictObject({
    /** Attention sinks: the first tokens, always kept (StreamingLLM's default 4); at most 2^20 (core MAX_TOKENS). */
    sinks: z.int().nonnegative().max(MAX_TOKENS, { error: tokens }).default(4).describe('Attention-sink tokens kept from the start of the prompt.'),
    /** Prefill tokens kept per layer, sinks included (sinks + recent window); at most 2^20 (core MAX_TOKENS). */
    budget: budgetOption('Prefill tokens kept per layer: the sinks plus the most recent tokens (default 256; excludes targetRatio).', tokens),
    /**
     * Target ratio (dense fp16 bytes ÷ bytes held) instead of a budget: the largest budget whose
     * measured ratio is ≥ the target at the actual T (`evictionBudget` in @kvpack/strategy-utils; the
     * positions are implied, so the ratio is T ÷ budget). Excludes budget; `compressionRatio` is accepted for it.
     */
    targetRatio: targetRatioOption(),
  })
  .refine(...budgetOrTarget)
  .refine((o) => o.sinks <= (o.budget ?? DEFAULT_BUDGET), { message: 'sinks must not exceed budget (the budget counts the sinks)', path: ['sinks'] });
export type StreamingLlmOptions = z.output<typeof StreamingLlmOptionsSchema>;

/**
 * Prefill positions StreamingLLM keeps of T tokens: all when T ≤ budget, else the first `sinks` and
 * the last budget − sinks, ascending.
 */
export function streamingKeptPositions(T: number, sinks: number, budget: number): Int32Array {
  if (T <= budget) return Int32Array.from({ length: T }, (_, i) => i);
  const recent = budget - sinks;
  return Int32Array.from({ length: budget }, (_, i) => (i < sinks ? i : T - recent + (i - sinks)));
}

/**
 * The `streamingllm` strategy (StreamingLLM, Xiao et al. 2024, arXiv 2309.17453; as a prefill press
 * like NVIDIA/kvpress's `StreamingLLMPress`): per layer, keep the attention sinks (first `sinks`
 * tokens) and the most recent budget − sinks tokens; the rest are dropped (tokenCount shrinks to
 * `budget`). The kept positions depend only on T, so they are implied, not stored. Kept keys keep
 * their **original** positions (rotated before eviction), as in kvpress without `KeyRerotationPress`;
 * the paper instead re-assigns positions within the cache. Decode tokens are appended exactly and
 * are not evicted. On MLA latent caches the same tokens' latents and RoPE keys are kept.
 * `compress` throws KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a
 * bad cache.
 */
export const streamingLlmDefinition = defineEvictionStrategy({
  name: 'streamingllm',
  description: 'StreamingLLM: keep attention sinks + the most recent tokens of the prefill (Xiao et al. 2024)',
  schema: StreamingLlmOptionsSchema,
  scorer: {
    budget: (o) => o.budget ?? DEFAULT_BUDGET,
    targetRatio: (o) => o.targetRatio,
    minBudget: (o) => Math.max(1, o.sinks),
    impliedPositions: (T, o, budget) => streamingKeptPositions(T, o.sinks, budget),
  },
});
