import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { KvpackError, MAX_ITEMS, MAX_TOKENS, listStrategies } from '@kvpack/core';
import '@kvpack/xkv';
import '@kvpack/baselines';
import { loadAccuracyConfig, resolveAccuracyConfig } from './config.js';

const repoRoot = resolve(fileURLToPath(new URL('.', import.meta.url)), '../../../..');
const example = resolve(repoRoot, 'examples', 'rulermini-accuracy.yaml');

describe('accuracy config', () => {
  it('examples/rulermini-accuracy.yaml covers every registered strategy over a range of settings', () => {
    const cfg = loadAccuracyConfig(example, {});
    expect(cfg.modelPath).toBe(resolve(repoRoot, '..', 'shared', 'models', 'rulermini-19m'));
    expect(cfg.evalPath).toBe(resolve(repoRoot, '..', 'shared', 'models', 'rulermini-19m', 'eval_1024.jsonl'));
    expect(cfg.data.tasks).toEqual(['niah_single']);
    expect(new Set(cfg.settings.map((s) => s.name))).toEqual(new Set(listStrategies()));
    expect(cfg.settings.filter((s) => s.name === 'xkv').map((s) => s.label)).toEqual([
      'xkv-4 rankK=4 rankV=6',
      'xkv-4 rankK=8 rankV=12',
      'xkv-4 rankK=16 rankV=24',
      'xkv-4 rankK=32 rankV=48',
      'xkv-4 sparse budget=128',
      'xkv-4 sparse budget=256',
      'xkv-4 sparse budget=512',
      'xkv-4 target targetRatio=16',
      'xkv-4 target targetRatio=32',
    ]);
    // MiniCache once on all layers and once at its default start (⌊L/2⌋, left to the strategy).
    expect(cfg.settings.filter((s) => s.name === 'minicache').map((s) => s.resolvedOptions.startLayer)).toEqual([0, undefined]);
  });

  it('the leaderboard examples: both query modes with a question separator; 16×/32× and 2×…32× settings', () => {
    const must = loadAccuracyConfig(resolve(repoRoot, 'examples', 'rulermini-leaderboard.yaml'), {});
    expect(must.data).toMatchObject({ question: { separator: 'what is' }, queryModes: ['agnostic', 'aware'], leaderboard: { dataset: 'ruler', dataDir: '1024' } });
    expect(must.settings.map((s) => s.label).slice(0, 6)).toEqual([
      'xkv targetRatio=16',
      'xkv targetRatio=32',
      'snapkv budget=64',
      'snapkv budget=32',
      'streamingllm budget=64',
      'streamingllm budget=32',
    ]);
    // Two stacked compositions (SnapKV keeping 1/2 or 1/4 → xKV-4 → int4), each at 16× and 32×.
    const stacked = must.settings.filter((s) => s.name === 'stacked');
    expect(stacked.map((s) => s.resolvedOptions.targetRatio)).toEqual([16, 32, 16, 32]);
    expect(stacked.map((s) => (s.resolvedOptions.evict as { options: { targetRatio: number } }).options.targetRatio)).toEqual([2, 2, 4, 4]);
    const sweep = loadAccuracyConfig(resolve(repoRoot, 'examples', 'rulermini-leaderboard-sweep.yaml'), {});
    expect(sweep.settings.filter((s) => s.name === 'xkv').map((s) => s.resolvedOptions.targetRatio)).toEqual([2, 4, 8, 16, 32]);
    expect(sweep.settings.filter((s) => s.name === 'snapkv').map((s) => s.resolvedOptions.budget)).toEqual([512, 256, 128, 64, 32]);
  });

  it('question: a field or a separator; queryModes agnostic needs one', () => {
    const base = { model: 'm', eval: 'e.jsonl', strategies: [{ name: 'dense' }] };
    expect(resolveAccuracyConfig({ ...base, question: { field: 'question' } }, '/tmp').data.question).toEqual({ field: 'question' });
    expect(resolveAccuracyConfig({ ...base, question: { separator: ['what is', 'what are'] } }, '/tmp').data.question).toEqual({ separator: ['what is', 'what are'] });
    expect(() => resolveAccuracyConfig({ ...base, question: { field: 'q', separator: 'x' } }, '/tmp', 'c.yaml')).toThrow(/invalid accuracy config c\.yaml/);
    expect(() => resolveAccuracyConfig({ ...base, queryModes: ['agnostic'] }, '/tmp', 'c.yaml')).toThrow(/queryModes: "agnostic" needs "question"/);
  });

  it('KVPACK_MODELS_DIR replaces modelsDir for the model and the eval file', () => {
    const cfg = loadAccuracyConfig(example, { KVPACK_MODELS_DIR: '/elsewhere/models' });
    expect(cfg.modelPath).toBe('/elsewhere/models/rulermini-19m');
    expect(cfg.evalPath).toBe('/elsewhere/models/rulermini-19m/eval_1024.jsonl');
  });

  it('names unknown keys, missing fields and bad strategy options', () => {
    const base = { model: 'm', eval: 'e.jsonl', strategies: [{ name: 'dense' }] };
    const err = (raw: unknown) => {
      try {
        resolveAccuracyConfig(raw, '/cfg', 'acc.yaml', {});
      } catch (e) {
        expect(e).toBeInstanceOf(KvpackError);
        return (e as Error).message;
      }
      throw new Error('expected an error');
    };
    expect(err({ ...base, limt: 3 })).toMatch(/^invalid accuracy config acc\.yaml:\n\(root\): unknown key "limt"/);
    expect(err({ model: 'm', strategies: [{ name: 'dense' }] })).toMatch(/eval: /);
    expect(err({ ...base, limit: 0 })).toMatch(/limit: /);
    expect(err({ ...base, strategies: [{ name: 'xkv', options: { rank: [4, 8] } }] })).toMatch(/^acc\.yaml: setting "xkv rank=4": invalid options for strategy "xkv"/);
    expect(err({ ...base, strategies: [{ name: 'nope' }] })).toMatch(/unknown strategy "nope"/);
    const ok = resolveAccuracyConfig(base, '/cfg', 'acc.yaml', {});
    expect(ok.evalPath).toBe('/cfg/e.jsonl');
    expect(ok.data).toMatchObject({ lastToken: 'decode', attentionQueries: 8, stopAtEos: true, bos: false, stopIds: [] });
  });

  it('bounds the counts that size work: limit ≤ 2^20 examples, maxNewTokens and attentionQueries ≤ 2^20 tokens, naming the bound', () => {
    const base = { model: 'm', eval: 'e.jsonl', strategies: [{ name: 'dense' }] };
    const cases: [string, number][] = [['limit', MAX_ITEMS], ['maxNewTokens', MAX_TOKENS], ['attentionQueries', MAX_TOKENS]];
    for (const [key, bound] of cases) {
      expect(resolveAccuracyConfig({ ...base, [key]: bound }, '/cfg', 'acc.yaml', {}).data).toMatchObject({ [key]: bound });
      let err: unknown;
      try {
        resolveAccuracyConfig({ ...base, [key]: bound + 1 }, '/cfg', 'acc.yaml', {});
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(KvpackError);
      expect((err as KvpackError).code).toBe('config');
      expect((err as Error).message).toContain(`${key}: must be at most ${bound}`);
    }
  });
});
