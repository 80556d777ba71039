import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { KvpackError } from './errors.js';
import { createStrategy, parseConfigText, readConfigFile } from './registry.js';
import './dense/index.js';

describe('parseConfigText (a strategy config typed on a page)', () => {
  it('reads YAML and JSON as the config files are read', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-cfg-'));
    try {
      const yaml = 'name: dense\noptions:\n  storage: float32\n';
      const json = '{"name": "dense", "options": {"storage": "float32"}}';
      writeFileSync(join(dir, 's.yaml'), yaml);
      writeFileSync(join(dir, 's.json'), json);
      const want = { name: 'dense', options: { storage: 'float32' } };
      expect(parseConfigText(yaml)).toEqual(want);
      expect(parseConfigText(json)).toEqual(want); // JSON is YAML
      expect(parseConfigText(json, 'json')).toEqual(want);
      expect(readConfigFile(join(dir, 's.yaml'))).toEqual(want);
      expect(readConfigFile(join(dir, 's.json'))).toEqual(want);
      expect(createStrategy(parseConfigText(yaml) as never).name).toBe('dense');
      // A bad file keeps its message: the file named, the format, the parser's reason.
      writeFileSync(join(dir, 'bad.json'), '{"name": ');
      expect(() => readConfigFile(join(dir, 'bad.json'))).toThrow(new RegExp(`^config file ${join(dir, 'bad.json')} is not valid JSON: `));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('names the text and the line of a syntax error', () => {
    let e: unknown;
    try {
      parseConfigText('name: xkv\noptions: {rankK: 4\n', 'yaml', 'the strategy text');
    } catch (x) {
      e = x;
    }
    expect(e).toBeInstanceOf(KvpackError);
    expect((e as KvpackError).code).toBe('config');
    expect((e as KvpackError).message).toMatch(/^the strategy text is not valid YAML: .*at line 3, column 1/s);
    expect(() => parseConfigText('{"a": }', 'json')).toThrow(/^config is not valid JSON: /);
  });
});
