import { describe, expect, it } from 'vitest';
import { getStrategyDefinition, listStrategies, unregisterStrategy } from '@kvpack/core';
import { registerBaselines, svdDefinition, snapKvDefinition } from './index.js';

describe('registerBaselines', () => {
  const names = ['kivi', 'minicache', 'quant', 'snapkv', 'streamingllm', 'svd'];
  it('registers the six baselines, idempotently, and again after they are unregistered', () => {
    registerBaselines();
    registerBaselines(); // a second call is a no-op, not a "different strategy" error
    for (const n of names) expect(listStrategies()).toContain(n);
    for (const n of names) expect(unregisterStrategy(n)).toBe(true);
    for (const n of names) expect(listStrategies()).not.toContain(n);
    registerBaselines();
    expect(getStrategyDefinition('svd')).toBe(svdDefinition);
    expect(getStrategyDefinition('snapkv')).toBe(snapKvDefinition);
  });
});
