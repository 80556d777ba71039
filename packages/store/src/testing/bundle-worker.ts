// Bundles the load worker into one ESM file (esbuild, once per test file), so that each worker
// process starts as plain node in a fraction of a second. ioredis stays external (resolved from this
// package's node_modules); @kvpack/core maps to core-lite.ts (no tfjs).
import { rmSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const here = dirname(fileURLToPath(import.meta.url));

/** Path of a fresh bundle of load-worker.ts, and a function that removes it. */
export async function bundleLoadWorker(): Promise<{ file: string; remove: () => void }> {
  const file = join(here, '..', '..', 'node_modules', '.cache', 'kvpack-store', `load-worker-${process.pid}-${randomBytes(4).toString('hex')}.mjs`);
  await build({
    entryPoints: [join(here, 'load-worker.ts')],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    outfile: file,
    external: ['ioredis'],
    alias: { '@kvpack/core': join(here, 'core-lite.ts') },
    logLevel: 'silent',
  });
  return { file, remove: () => rmSync(file, { force: true }) };
}
