#!/usr/bin/env node
// `pnpm check:publish`: packs every package once, then runs publint (strict) and
// @arethetypeswrong/cli (all resolution modes: node10, node16 from CJS and ESM, bundler) on each
// tarball. Exits non-zero on any problem.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ROOT, packAll } from './pack-all.mjs';

const dest = mkdtempSync(join(tmpdir(), 'kvpack-publish-'));
let failed = 0;
try {
  for (const p of packAll(dest)) {
    for (const [tool, args] of [
      ['publint', ['exec', 'publint', '--strict', p.tarball]],
      ['attw', ['exec', 'attw', '--format', 'table-flipped', p.tarball]],
    ]) {
      const r = spawnSync('pnpm', args, { cwd: ROOT, encoding: 'utf8' });
      const ok = r.status === 0;
      process.stdout.write(`${ok ? 'ok  ' : 'FAIL'} ${tool} ${p.name}@${p.version}\n`);
      if (!ok) {
        failed++;
        process.stdout.write(`${r.stdout}${r.stderr}\n`);
      }
    }
  }
} finally {
  rmSync(dest, { recursive: true, force: true });
}
if (failed) {
  process.stderr.write(`check:publish: ${failed} check(s) failed\n`);
  process.exit(1);
}
process.stdout.write('check:publish: publint and attw clean for every package\n');
