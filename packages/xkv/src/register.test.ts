import { describe, expect, it } from 'vitest';
import { getStrategyDefinition, listStrategies, unregisterStrategy } from '@kvpack/core';
import { lowRankStats as shared } from '@kvpack/strategy-utils';
import { lowRankStats, registerXkv, xkvDefinition } from './index.js';

describe('registerXkv', () => {
  it('registers xkv, idempotently, and again after it is unregistered', () => {
    registerXkv();
    registerXkv();
    expect(getStrategyDefinition('xkv')).toBe(xkvDefinition);
    expect(unregisterStrategy('xkv')).toBe(true);
    expect(listStrategies()).not.toContain('xkv');
    registerXkv();
    expect(getStrategyDefinition('xkv')).toBe(xkvDefinition);
  });
});

describe('@kvpack/xkv exports', () => {
  it('lowRankStats, as the README imports it, is the shared cache statistics function', () => {
    expect(lowRankStats).toBe(shared);
  });
});
