#!/usr/bin/env node
// CI check of the end-to-end example: runs session/main.ts on the wasm backend and compares its
// output tokens with expected-tokens.json (recorded on wasm); the tokens decoded from the restored
// cache must equal those of the in-memory cache. Regenerate after an intended change: --write.
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const here = import.meta.dirname;
const expectedFile = join(here, 'expected-tokens.json');
const out = execFileSync('pnpm', ['exec', 'tsx', join(here, 'main.ts'), '--json', '--out', join(here, 'cache.kvpk')], {
  cwd: join(here, '..'),
  encoding: 'utf8',
  env: { ...process.env, KVPACK_BACKEND: 'wasm' },
  stdio: ['ignore', 'pipe', 'inherit'],
});
const got = JSON.parse(out.trim().split('\n').pop());
const tokens = { promptTokens: got.promptTokens, first: got.first, fromFile: got.fromFile };
if (process.argv.includes('--write')) {
  writeFileSync(expectedFile, `${JSON.stringify(tokens, null, 2)}\n`);
  console.log(`wrote ${expectedFile}`);
  process.exit(0);
}
const expected = JSON.parse(readFileSync(expectedFile, 'utf8'));
const problems = [];
if (JSON.stringify(got.fromFile) !== JSON.stringify(got.inMemory)) problems.push(`restored ${got.fromFile} ≠ in-memory ${got.inMemory}`);
for (const k of Object.keys(expected))
  if (JSON.stringify(tokens[k]) !== JSON.stringify(expected[k])) problems.push(`${k}: got ${JSON.stringify(tokens[k])}, expected ${JSON.stringify(expected[k])}`);
if (problems.length) {
  console.error(`examples/session: ${problems.join('; ')}`);
  process.exit(1);
}
console.log(`examples/session: ok (${got.first.length + got.fromFile.length} tokens as expected, ratio ${got.ratio.toFixed(2)}×, restored = in-memory)`);
