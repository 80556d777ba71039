import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { KvpackError, listStrategies, unregisterStrategy } from '@kvpack/core';
import { loadConfig } from './config.js';
import { loadConfigPlugins } from './plugins.js';

const fixture = resolve(import.meta.dirname, 'testing/plugin-fixture.mjs');

function config(dir: string, plugins: string[], strategy: string): string {
  const path = join(dir, 'bench.json');
  writeFileSync(
    path,
    JSON.stringify({ model: 'm.bin', plugins, prompts: [{ ids: [1, 2, 3, 4] , continuationTokens: 1 }], strategies: [{ name: strategy }] }),
  );
  return path;
}

describe('config plugins', () => {
  it('imports the modules named under plugins: before the strategies are checked', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-plugins-'));
    unregisterStrategy('plugin-dense');
    const path = config(dir, [fixture], 'plugin-dense');
    expect(() => loadConfig(path)).toThrow(/unknown strategy "plugin-dense"/);
    expect(await loadConfigPlugins(path)).toEqual([fixture]);
    expect(listStrategies()).toContain('plugin-dense');
    expect(loadConfig(path).settings.map((s) => s.name)).toEqual(['plugin-dense']);
    unregisterStrategy('plugin-dense');
  });

  it('a missing plugin is a config error naming it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-plugins-'));
    const err = await loadConfigPlugins(config(dir, ['kvpack-no-such-plugin'], 'dense')).catch((e) => e);
    expect(err).toBeInstanceOf(KvpackError);
    expect(err.message).toMatch(/plugin "kvpack-no-such-plugin" not found .*npm i kvpack-no-such-plugin/);
  });
});
