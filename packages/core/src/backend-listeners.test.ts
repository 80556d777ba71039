import { describe, expect, it } from 'vitest';
import { selectBackend } from './backend.js';

describe('selectBackend leaves process error handling alone', () => {
  it('removes the uncaughtException / unhandledRejection listeners the wasm backend installs', async () => {
    const before = ['uncaughtException', 'unhandledRejection'].map((ev) => process.listeners(ev as 'uncaughtException').slice());
    await selectBackend('wasm');
    const after = ['uncaughtException', 'unhandledRejection'].map((ev) => process.listeners(ev as 'uncaughtException'));
    expect(after.map((a) => a.length)).toEqual(before.map((b) => b.length));
    after.forEach((a, i) => a.forEach((l) => expect(before[i]).toContain(l)));
  });
});
