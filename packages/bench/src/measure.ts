import { performance } from 'node:perf_hooks';
import { check, compressionRatio, compressionRatioOf, denseCacheBytes, type CompressedCache } from '@kvpack/core';
import type { ResolvedSetting } from './config.js';
import { greedyAgreement, reconstructionSums } from './metrics.js';
import type { BenchModel } from './model.js';
import { greedyFrom, teacherForced, type PreparedPrompt } from './prepare.js';
import type { PromptResult, RunOptions } from './results.js';
import { buildStrategy, strategyPaperRatio } from './strategy.js';
import { settingQueryWindow } from './query-window.js';
import { withReconstructionScores } from '@kvpack/models';

/** Calls `stats()` on a cache when it has such a method (recorded as the result's `strategyStats`). */
function cacheStats(c: CompressedCache): unknown {
  const s = (c as unknown as { stats?: unknown }).stats;
  if (typeof s === 'function') return (s as () => unknown).call(c);
  return s && typeof s === 'object' ? s : undefined;
}

/**
 * Measures one setting on one prepared prompt: compress (timed `repeats` times), bytes,
 * reconstruction error, the teacher-forced NLL of the continuation through the compressed cache, and
 * greedy tokens through a second compressed copy.
 * @throws KvpackError whatever the strategy throws.
 */
export async function measureSetting(model: BenchModel, s: ResolvedSetting, pp: PreparedPrompt, opts: RunOptions): Promise<PromptResult> {
  const w = settingQueryWindow(s) ?? 0;
  const cache = pp.caches.get(w)!;
  const { contextIds: ctx, continuationIds: cont } = pp.prompt;
  const T = ctx.length - 1;
  const strategy = buildStrategy(s);
  // A strategy that scores by context reconstruction gets the pass each time (counted in its compress time).
  const compress = async (): Promise<CompressedCache> => {
    const view = await withReconstructionScores(model, strategy, cache, ctx.slice(0, T));
    try {
      return await strategy.compress(view.cache);
    } finally {
      view.dispose();
    }
  };
  const times: number[] = [];
  const made: CompressedCache[] = [];
  try {
    for (let r = 0; r < Math.max(1, opts.repeats); r++) {
      const t0 = performance.now();
      const c = await compress();
      times.push(performance.now() - t0);
      if (made.length < 2) made.push(c);
      else c.dispose();
    }
    const c = made[0];
    const bytes = c.byteSize();
    check(bytes > 0, 'unsupported', `${s.label}: compressed cache reports ${bytes} bytes`);
    const denseBytes = denseCacheBytes(cache.layout, T);
    const stats = cacheStats(c);
    const rec = await reconstructionSums(cache, c);
    const { meanNll: nll, argmax } = await teacherForced(model, c, ctx[T], T, cont);
    const top1Matches = argmax.filter((a, i) => a === pp.ref.continuationArgmax[i]).length;
    c.dispose();
    let greedyTokens: number[] = [];
    if (opts.decodeTokens > 0) {
      const c2 = made[1] ?? (await compress());
      if (!made[1]) made.push(c2);
      greedyTokens = (await greedyFrom(model, c2, { feed: ctx[T], position: T }, opts.decodeTokens)).ids;
    }
    const ag = greedyAgreement(pp.ref.greedyTokens, greedyTokens);
    return {
      prompt: pp.prompt.name,
      tokens: T,
      bytes,
      denseBytes,
      ratio: compressionRatio(cache.layout, T, bytes),
      compressionRatio: compressionRatioOf(compressionRatio(cache.layout, T, bytes)),
      paperRatio: strategyPaperRatio(s, cache.layout, T),
      keyErrorSums: rec?.keys ?? null,
      valueErrorSums: rec?.values ?? null,
      perLayer: rec?.perLayer ?? null,
      nll,
      nllReference: pp.ref.nll,
      continuationTokens: cont.length,
      top1Matches,
      greedyTokens,
      agreementMatches: ag.matches,
      agreementTotal: ag.total,
      firstDivergence: ag.firstDivergence,
      compressMs: times,
      ...(stats !== undefined ? { strategyStats: stats } : {}),
    };
  } finally {
    for (const c of made) c.dispose();
  }
}
