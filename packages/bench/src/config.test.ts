import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { KvpackError, MAX_ITEMS, MAX_REPEATS, MAX_TOKENS } from '@kvpack/core';
import '@kvpack/xkv';
import '@kvpack/baselines';
import { loadConfig, quickOverrides, resolveConfig } from './config.js';

const base = { model: 'm.bin', prompts: [{ text: 'Once upon a time' }], strategies: [{ name: 'dense' }] };

function err(raw: unknown): string {
  try {
    resolveConfig(raw, '/cfg', 'test.yaml', {});
    return 'no error';
  } catch (e) {
    expect(e).toBeInstanceOf(KvpackError);
    return (e as Error).message;
  }
}

describe('bench config', () => {
  it('bounds every count that sizes work (tokens ≤ 2^20, repeats ≤ 1000, prompts ≤ 2^20), accepted at the bound and naming it past it', () => {
    const cases: [string, number, (v: number) => Record<string, unknown>][] = [
      ['continuationTokens', MAX_TOKENS, (v) => ({ continuationTokens: v })],
      ['decodeTokens', MAX_TOKENS, (v) => ({ decodeTokens: v })],
      ['repeats', MAX_REPEATS, (v) => ({ repeats: v })],
      ['prompts[0].maxTokens', MAX_TOKENS, (v) => ({ prompts: [{ text: 'hi', maxTokens: v }] })],
      ['strategies[0].observationWindow', MAX_TOKENS, (v) => ({ strategies: [{ name: 'dense', observationWindow: v }] })],
      ['quick.decodeTokens', MAX_TOKENS, (v) => ({ quick: { decodeTokens: v } })],
      ['quick.maxPrompts', MAX_ITEMS, (v) => ({ quick: { maxPrompts: v } })],
      ['quick.repeats', MAX_REPEATS, (v) => ({ quick: { repeats: v } })],
    ];
    for (const [path, bound, set] of cases) {
      expect(err({ ...base, ...set(bound) }), `${path} = ${bound}`).toBe('no error');
      expect(err({ ...base, ...set(bound + 1) })).toContain(`${path}: must be at most ${bound}`);
    }
    expect(MAX_REPEATS).toBe(1000);
  });

  it('applies defaults and resolves paths against modelsDir, or KVPACK_MODELS_DIR when set', () => {
    const c = resolveConfig({ ...base, modelsDir: '../models', tokenizer: 'tok.bin' }, '/repo/examples', 'x', {});
    expect(c.modelPath).toBe(resolve('/repo/models/m.bin'));
    expect(c.tokenizerPath).toBe(resolve('/repo/models/tok.bin'));
    expect(c.data.decodeTokens).toBe(32);
    expect(c.data.continuationTokens).toBe(32);
    expect(c.data.bos).toBe(true);
    expect(c.settings[0].resolvedOptions).toEqual({ storage: 'float16' });
    const e = resolveConfig({ ...base, modelsDir: '../models' }, '/repo/examples', 'x', { KVPACK_MODELS_DIR: '/mnt/models' });
    expect(e.modelPath).toBe(resolve('/mnt/models/m.bin'));
    expect(resolveConfig(base, '/repo/examples', 'x', {}).modelPath).toBe(resolve('/repo/examples/m.bin'));
  });

  it('names unknown keys at every level', () => {
    expect(err({ ...base, modle: 'x' })).toMatch(/\(root\): unknown key "modle"/);
    expect(err({ ...base, strategies: [{ name: 'dense', option: {} }] })).toMatch(/strategies\[0\]: unknown key "option"/);
    expect(err({ ...base, quick: { decodeToken: 3 } })).toMatch(/quick: unknown key "decodeToken"/);
  });

  it('explains bad prompts, missing fields and wrong types', () => {
    expect(err({ ...base, prompts: [{ txt: 'a' }] })).toMatch(/prompts\[0\]: a prompt needs one of: text, file, prompt \+ continuation, ids/);
    expect(err({ ...base, prompts: [{ text: 'a', ids: [1, 2] }] })).toMatch(/prompts\[0\]: a prompt takes one source, got text and ids/);
    expect(err({ prompts: base.prompts, strategies: base.strategies })).toMatch(/model: /);
    expect(err({ ...base, decodeTokens: -1 })).toMatch(/decodeTokens: /);
    expect(err({ ...base, strategies: [] })).toMatch(/strategies: /);
  });

  it('checks every expanded setting against its strategy schema', () => {
    expect(err({ ...base, strategies: [{ name: 'nope' }] })).toMatch(/unknown strategy "nope"; registered strategies: .*xkv/);
    const m = err({ ...base, strategies: [{ name: 'xkv', options: { layersPerGroup: [1, 0] } }] });
    expect(m).toMatch(/setting "xkv layersPerGroup=0"/);
    expect(m).toMatch(/layersPerGroup/);
    expect(err({ ...base, strategies: [{ name: 'xkv', options: { rankk: 4 } }] })).toMatch(/allowed options: layersPerGroup, rankK, rankV/);
  });

  it('reads YAML files, text prompt files relative to the config, and quick overrides', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-cfg-'));
    writeFileSync(join(dir, 'story.txt'), 'Once upon a time there was a cat.');
    writeFileSync(
      join(dir, 'b.yaml'),
      ['model: m.bin', 'prompts:', '  - file: story.txt', '    continuationTokens: 4', 'quick: { decodeTokens: 8 }', 'strategies:', '  - { name: xkv, options: { layersPerGroup: [1, 2] } }'].join('\n'),
    );
    const c = loadConfig(join(dir, 'b.yaml'), {});
    expect(c.prompts[0]).toMatchObject({ text: 'Once upon a time there was a cat.', continuationTokens: 4, name: 'story.txt' });
    expect(c.settings.map((s) => s.label)).toEqual(['xkv layersPerGroup=1', 'xkv layersPerGroup=2']);
    expect(quickOverrides(c)).toEqual({ decodeTokens: 8, continuationTokens: 32, maxPrompts: 1, repeats: 1 });
    writeFileSync(join(dir, 'bad.yaml'), 'model: [unclosed');
    expect(() => loadConfig(join(dir, 'bad.yaml'), {})).toThrow(/not valid YAML/);
    expect(() => loadConfig(join(dir, 'absent.yaml'), {})).toThrow(/does not exist/);
    writeFileSync(join(dir, 'c.yaml'), 'model: m.bin\nprompts: [{ file: nope.txt }]\nstrategies: [{ name: dense }]');
    expect(() => loadConfig(join(dir, 'c.yaml'), {})).toThrow(/nope\.txt does not exist/);
  });
});
