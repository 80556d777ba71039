#!/usr/bin/env node
// `pnpm pack:smoke`: what a user gets from npm, checked from the packed tarballs.
//   1. packs every package (pnpm pack: prepack builds, workspace:^ becomes the real version);
//   2. installs all tarballs into a fresh plain-npm project in a temp folder (peers come from npm's
//      automatic peer install; optional peers — vega, tfjs-node, webgpu — stay out);
//   3. imports every package in ESM and in CommonJS, and registers and runs a strategy in both;
//   4. type-checks a consumer (.mts + .cts) under --module node16 and a .ts one under
//      --moduleResolution bundler, both with skipLibCheck false;
//   5. runs `npx kvpack --help` and `npx kvpack --version`.
// Keeps the temp folder with KEEP=1. Exits non-zero on the first failure.
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ROOT, packAll } from './pack-all.mjs';

const work = mkdtempSync(join(tmpdir(), 'kvpack-smoke-'));
const step = (m) => process.stdout.write(`pack-smoke: ${m}\n`);
const run = (cmd, args, opts = {}) => execFileSync(cmd, args, { cwd: app, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], ...opts });
const app = join(work, 'app');

try {
  step(`packing into ${work}/tarballs`);
  const packed = packAll(join(work, 'tarballs'));
  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'kvpack-consumer', version: '1.0.0', private: true }, null, 2));
  step(`npm install ${packed.map((p) => p.name).join(' ')} (+ typescript, @types/node for the type checks)`);
  run('npm', ['install', '--no-audit', '--no-fund', '--loglevel=error', ...packed.map((p) => p.tarball), 'typescript@5.9.3', '@types/node@^20.19.0'], { stdio: ['ignore', 'pipe', 'inherit'] });

  const names = packed.map((p) => p.name);
  // --- runtime: ESM and CJS ---
  const body = (load) => `
${load}
const assert = (c, m) => { if (!c) { console.error('FAIL: ' + m); process.exit(1); } };
for (const [n, m] of Object.entries(mods)) assert(m && Object.keys(m).length > 0, n + ' exports nothing');
const core = mods['@kvpack/core'];
mods['@kvpack/xkv'].registerXkv();
mods['@kvpack/baselines'].registerBaselines();
const names = core.listStrategies();
for (const n of ['dense', 'xkv', 'svd', 'kivi', 'quant', 'minicache', 'streamingllm', 'snapkv']) assert(names.includes(n), n + ' not registered: ' + names);
const choice = await core.selectBackend('cpu');
assert(core.describeBackend(choice).includes('cpu'), 'describeBackend');
const tf = mods['@tensorflow/tfjs-core'];
const layout = { nLayers: 2, nHeads: 2, nKvHeads: 2, headDim: 4 };
const cache = {
  layout,
  rope: { theta: 10000, layout: 'interleaved' },
  keys: [0, 1].map((l) => tf.randomNormal([16, 2, 4], 0, 1, 'float32', l + 1)),
  values: [0, 1].map((l) => tf.randomNormal([16, 2, 4], 0, 1, 'float32', l + 11)),
};
const strategy = core.createStrategy({ name: 'xkv', options: { layersPerGroup: 2, rankK: 2, rankV: 2 } });
const compressed = await strategy.compress(cache);
const k = compressed.keys(1);
assert(k.shape.join() === '16,2,4', 'keys(1) shape ' + k.shape);
const ratio = core.compressionRatio(layout, 16, compressed.byteSize());
assert(ratio > 1, 'compression ratio ' + ratio);
k.dispose();
compressed.dispose();
let threw = null;
try { core.createStrategy({ name: 'xvk' }); } catch (e) { threw = e; }
assert(threw && /did you mean "xkv"/.test(threw.message), 'unknown-strategy hint: ' + threw?.message);
console.log(JSON.stringify({ format: FORMAT, strategies: names.length, backend: choice.name, strategy: strategy.name, ratio: +ratio.toFixed(3) }));
`;
  const list = JSON.stringify([...names, '@tensorflow/tfjs-core']);
  writeFileSync(join(app, 'esm.mjs'), `const FORMAT = 'esm';\nconst mods = {};\nfor (const n of ${list}) mods[n] = await import(n);\n${body('')}`);
  writeFileSync(
    join(app, 'cjs.cjs'),
    `const FORMAT = 'cjs';\nconst mods = {};\nfor (const n of ${list}) mods[n] = require(n);\n(async () => {\n${body('')}\n})().catch((e) => { console.error(e); process.exit(1); });\n`,
  );
  for (const f of ['esm.mjs', 'cjs.cjs']) step(`node ${f}: ${run('node', [f]).trim()}`);

  // --- types: node16 (ESM + CJS consumers) and bundler, skipLibCheck false ---
  const typed = `
import { createStrategy, describeBackend, selectBackend, type KVCache, type StrategyDefinition } from '@kvpack/core';
import { runStrategyConformance, syntheticCache } from '@kvpack/core/conformance';
import { registerXkv, xkvDefinition } from '@kvpack/xkv';
import { registerBaselines } from '@kvpack/baselines';
import { lowRankOptionShape } from '@kvpack/strategy-utils';
import { loadModel } from '@kvpack/models';
import { runCli, renderRatioPlot } from '@kvpack/bench';
registerXkv();
registerBaselines();
export const used = [createStrategy, describeBackend, selectBackend, runStrategyConformance, syntheticCache, lowRankOptionShape, loadModel, runCli, renderRatioPlot];
export const def: StrategyDefinition = xkvDefinition as unknown as StrategyDefinition;
export type C = KVCache;
`;
  writeFileSync(join(app, 'consumer.mts'), typed);
  writeFileSync(join(app, 'consumer.cts'), typed);
  writeFileSync(join(app, 'bundler.ts'), typed);
  // No \`types\` list: tfjs-core's declarations need @types/long, which it brings as a dependency.
  const base = { strict: true, noEmit: true, skipLibCheck: false, target: 'ES2022' };
  writeFileSync(join(app, 'tsconfig.node16.json'), JSON.stringify({ compilerOptions: { ...base, module: 'node16', moduleResolution: 'node16' }, files: ['consumer.mts', 'consumer.cts'] }));
  writeFileSync(join(app, 'tsconfig.bundler.json'), JSON.stringify({ compilerOptions: { ...base, module: 'preserve', moduleResolution: 'bundler' }, files: ['bundler.ts'] }));
  for (const cfg of ['tsconfig.node16.json', 'tsconfig.bundler.json']) {
    run('npx', ['--no-install', 'tsc', '-p', cfg]);
    step(`tsc -p ${cfg}: ok (skipLibCheck false)`);
  }

  // --- the CLI ---
  const help = run('npx', ['--no-install', 'kvpack', '--help']);
  for (const c of ['bench', 'strategies']) if (!help.includes(c)) throw new Error(`kvpack --help does not list "${c}":\n${help}`);
  step(`npx kvpack --help: ok (${help.trim().split('\n').length} lines); --version ${run('npx', ['--no-install', 'kvpack', '--version']).trim()}`);
  // The CLI end to end from the tarballs, on the repository's embedded model (a tiny run).
  const cfg = join(app, 'smoke-bench.yaml');
  writeFileSync(
    cfg,
    [
      `modelsDir: ${JSON.stringify(join(ROOT, 'models'))}`,
      'model: stories260K/stories260K_q80.bin',
      'tokenizer: stories260K/tok512.bin',
      'prompts: [{ text: "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.", continuationTokens: 8 }]',
      'decodeTokens: 4',
      'repeats: 1',
      'strategies: [{ name: dense }, { name: xkv, options: { layersPerGroup: 1, rankK: 4, rankV: 4 } }, { name: kivi, options: { bits: 4, quantGroupSize: 8, residualLength: 8 } }]',
    ].join('\n'),
  );
  const benchOut = run('npx', ['--no-install', 'kvpack', 'bench', cfg, '--backend', 'wasm', '--no-plot', '--out', join(app, 'bench-out')], { env: { ...process.env, KVPACK_MODELS_DIR: '' } });
  if (!/\| xkv +\|/.test(benchOut) || !/\| kivi +\|/.test(benchOut)) throw new Error(`kvpack bench printed no xkv/kivi rows:\n${benchOut}`);
  step('npx kvpack bench (embedded stories260K, wasm): table printed');
  const du = run('du', ['-sm', '--exclude=typescript', '--exclude=@types', 'node_modules']).split('\t')[0];
  step(`node_modules of the consumer (without typescript and @types): ${du} MB`);
  step('all checks passed');
} catch (e) {
  process.stderr.write(`pack-smoke: FAILED: ${e.message}\n${e.stdout ?? ''}${e.stderr ?? ''}\n(folder kept: ${work})\n`);
  process.exitCode = 1;
} finally {
  if (!process.exitCode && !process.env.KEEP) rmSync(work, { recursive: true, force: true });
}
