#!/usr/bin/env node
// Bundles one entry of scripts/gpu into a self-contained CommonJS file with esbuild (the one tsup
// brings), plus the tfjs wasm files next to it:  node scripts/gpu/bundle.mjs ENTRY.ts OUTDIR
// The entry imports the packages by name (@kvpack/core, @kvpack/bench, …): they resolve to their
// built dist/ folders, so run `pnpm build` first. Dawn's addon (`webgpu`) stays external: the entry
// loads it from KVPACK_DAWN_NODE on the GPU host (bundle.sh carries it).
import { copyFileSync, existsSync, mkdirSync, readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const [entry, out] = process.argv.slice(2);
if (!entry || !out) {
  console.error('usage: node scripts/gpu/bundle.mjs ENTRY.ts OUTDIR');
  process.exit(2);
}
for (const p of ['core', 'strategy-utils', 'xkv', 'baselines', 'models', 'bench'])
  if (!existsSync(join(root, 'packages', p, 'dist', 'index.cjs'))) {
    console.error(`bundle.mjs: packages/${p}/dist is missing; run pnpm build first`);
    process.exit(1);
  }
// esbuild comes with tsup (a root devDependency).
const esbuild = createRequire(createRequire(join(root, 'package.json')).resolve('tsup'))('esbuild');
mkdirSync(out, { recursive: true });
await esbuild.build({
  entryPoints: [resolve(entry)],
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  external: ['webgpu'],
  // @kvpack/* by name, to each package's folder (its package.json points at dist/); other imports of
  // the entry resolve from the bench package's dependencies.
  alias: {
    ...Object.fromEntries(['core', 'xkv', 'baselines', 'models', 'bench'].map((p) => [`@kvpack/${p}`, join(root, 'packages', p)])),
    // strategy-utils by its CommonJS files, entry and subpath alike: the packages' dist/ files require
    // it, and an ESM copy beside the CommonJS one would hold its own module state (the benchmarks'
    // product selection would not reach the strategies).
    '@kvpack/strategy-utils/internal': join(root, 'packages', 'strategy-utils', 'dist', 'internal.cjs'),
    '@kvpack/strategy-utils': join(root, 'packages', 'strategy-utils', 'dist', 'index.cjs'),
    // No plots on the GPU host (and vega's Node build has a top-level await CommonJS cannot hold).
    vega: join(root, 'scripts', 'gpu', 'no-plots.cjs'),
    'vega-lite': join(root, 'scripts', 'gpu', 'no-plots.cjs'),
  },
  nodePaths: [join(root, 'packages', 'bench', 'node_modules')],
  // Sources that locate files from import.meta.url get the bundle's own URL under CommonJS.
  define: { 'import.meta.url': '__kvpackBundleUrl' },
  banner: { js: "const __kvpackBundleUrl = require('node:url').pathToFileURL(__filename).href;" },
  outfile: join(out, 'entry.cjs'),
  logLevel: 'warning',
});
// tfjs-backend-wasm loads its .wasm files from next to the bundle.
const wasmDir = join(dirname(createRequire(join(root, 'packages', 'core', 'package.json')).resolve('@tensorflow/tfjs-backend-wasm/package.json')), 'dist');
for (const f of readdirSync(wasmDir).filter((f) => f.endsWith('.wasm'))) copyFileSync(join(wasmDir, f), join(out, f));
console.log(`bundled ${entry} → ${join(out, 'entry.cjs')}`);
