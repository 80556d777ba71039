import { MAX_TOKENS, atMost } from '@kvpack/core';
import { z } from 'zod';

const tokenCount = (what: string) => atMost(MAX_TOKENS, `${what}; 2^20 tokens of one layer's keys already fill the wasm heap`);

/**
 * Options of the sparse decode mode (`sparse` in the xkv options). Every count is at most 2^20
 * (core MAX_TOKENS): a token count beyond it can never be met by a cache kvpack holds.
 */
export const SparseOptionsSchema = z
  .strictObject({
    /** Tokens rebuilt per KV head and decode step (a multiple of chunkSize); default 2,048 (ShadowKV / xKV-SR); at most 2^20. */
    budget: z.int().positive().max(MAX_TOKENS, { error: tokenCount('tokens') }).default(2048).describe('Tokens rebuilt per KV head and decode step (a multiple of chunkSize; ShadowKV / xKV-SR).'),
    /** Tokens per chunk (one landmark each); default 8; at most 2^20. */
    chunkSize: z.int().positive().max(MAX_TOKENS, { error: tokenCount('tokens') }).default(8).describe('Tokens per chunk (one landmark each).'),
    /**
     * Outlier chunks per layer and KV head kept exact (16-bit); default 48, ShadowKV's count for a
     * 2,048 budget (24 per 1,024). At most the number of chunks (and at most 2^20).
     */
    outlierChunks: z.int().nonnegative().max(MAX_TOKENS, { error: tokenCount('chunks') }).default(48).describe('Outlier chunks per layer and KV head kept exact (16-bit).'),
    /** The last prompt tokens kept exact (16-bit), rounded up to whole chunks; default 32 (ShadowKV: 4 chunks); at most 2^20. */
    localTokens: z.int().nonnegative().max(MAX_TOKENS, { error: tokenCount('tokens') }).default(32).describe('The last prompt tokens kept exact (16-bit), rounded up to whole chunks.'),
  })
  .refine((o) => o.budget % o.chunkSize === 0, { message: 'budget must be a multiple of chunkSize', path: ['budget'] });
export type SparseOptions = z.output<typeof SparseOptionsSchema>;
