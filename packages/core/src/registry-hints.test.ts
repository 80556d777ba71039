import { describe, expect, it } from 'vitest';
import { KvpackError } from './errors.js';
import { getStrategyDefinition, nearestStrategyName } from './registry.js';
import './index.js';

function message(name: string): string {
  try {
    getStrategyDefinition(name);
  } catch (e) {
    expect(e).toBeInstanceOf(KvpackError);
    expect((e as KvpackError).code).toBe('unknown-strategy');
    return (e as Error).message;
  }
  throw new Error(`"${name}" resolved`);
}

describe('unknown strategy messages', () => {
  it('name the import that registers a known strategy that is not loaded', () => {
    // Only @kvpack/core is imported here: xkv and the baselines are not registered.
    expect(message('xkv')).toMatch(/"xkv" is in @kvpack\/xkv, not registered in this process: import \{ registerXkv \} from '@kvpack\/xkv'; registerXkv\(\)/);
    expect(message('snapkv')).toMatch(/@kvpack\/baselines.*registerBaselines\(\)/);
  });

  it('suggest the nearest name: a swap, a typo, a case or separator variant', () => {
    expect(message('xvk')).toMatch(/did you mean "xkv"\? \(registered by @kvpack\/xkv/);
    expect(message('dnese')).toMatch(/did you mean "dense"\?$/);
    expect(message('Streaming-LLM')).toMatch(/did you mean "streamingllm"/);
    expect(message('completely-different')).toMatch(/third-party strategy registers when its package is imported/);
  });

  it('nearestStrategyName allows at most 2 edits, fewer on short names', () => {
    expect(nearestStrategyName('kivv', ['kivi', 'svd'])).toBe('kivi');
    expect(nearestStrategyName('sv', ['kivi', 'svd'])).toBe('svd');
    expect(nearestStrategyName('ab', ['kivi', 'svd'])).toBeNull();
    expect(nearestStrategyName('quantt', ['quant'])).toBe('quant');
    expect(nearestStrategyName('minicach3x', ['minicache'])).toBe('minicache'); // 2 edits
    expect(nearestStrategyName('mimicacha3', ['minicache'])).toBeNull(); // 3 edits;
  });
});
