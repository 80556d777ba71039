import { KvpackError, disposeKVCache } from '@kvpack/core';
import type { ResolvedSetting } from './config.js';
import type { BenchModel } from './model.js';
import { measureSetting } from './measure.js';
import { preparePrompt, type PreparedPrompt } from './prepare.js';
import { settingQueryWindow } from './query-window.js';
import { aggregate, failedResult, type BenchPrompt, type BenchRunResult, type PromptResult, type RunHooks, type RunOptions, type SettingResult } from './results.js';

export * from './results.js';
export { settingQueryWindow } from './query-window.js';
export * from './strategy.js';

/**
 * Runs every setting on every prompt. Per prompt: one uncompressed forward pass over context +
 * continuation gives the reference NLL; one prefill of the context minus its last token gives the
 * KV cache every setting compresses (a second prefill carrying queries is made for each distinct
 * query window, only when a query-aware strategy asks for it); a dense float32 cache gives the
 * reference greedy tokens. Per setting: compress (timed `repeats` times), measure bytes and
 * reconstruction error, decode the last context token + continuation teacher-forced through the
 * compressed cache for the NLL, and greedy-decode `decodeTokens` tokens through a fresh copy.
 * A setting whose strategy throws a KvpackError (e.g. a rank or group size the model cannot take)
 * is recorded with `error` set and the run goes on.
 * @throws KvpackError('config') when a prompt is too short or too long for the model.
 */
export async function runBench(model: BenchModel, prompts: BenchPrompt[], settings: ResolvedSetting[], opts: RunOptions, hooks: RunHooks = {}): Promise<BenchRunResult> {
  if (prompts.length === 0) throw new KvpackError('config', 'no prompts to run');
  const windows = [0, ...new Set(settings.map(settingQueryWindow).filter((w): w is number => w !== null))];
  const prepared: PreparedPrompt[] = [];
  try {
    for (const p of prompts) prepared.push(await preparePrompt(model, p, windows, opts.decodeTokens));
    const total = settings.length * prompts.length;
    hooks.onStart?.(total);
    let done = 0;
    const results: SettingResult[] = [];
    for (const [i, s] of settings.entries()) {
      const per: PromptResult[] = [];
      let error: string | undefined;
      for (const pp of prepared) {
        try {
          if (error === undefined) per.push(await measureSetting(model, s, pp, opts));
        } catch (e) {
          if (!(e instanceof KvpackError)) throw e;
          error = e.message;
        }
        hooks.onStep?.(++done, total, s.label);
      }
      const r = error === undefined ? aggregate(s, settingQueryWindow(s), per) : failedResult(s, settingQueryWindow(s), error);
      results.push(r);
      hooks.onSettingDone?.(r, i, settings.length);
    }
    return { layout: prepared[0].caches.get(0)!.layout, references: prepared.map((p) => p.ref), results };
  } finally {
    for (const pp of prepared) for (const c of pp.caches.values()) disposeKVCache(c);
  }
}
