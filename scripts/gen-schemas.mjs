#!/usr/bin/env node
// Writes the config JSON Schemas (generated from the zod schemas) into packages/bench/schemas/.
// Run after `pnpm build`: node scripts/gen-schemas.mjs. A bench test fails when they are stale.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from './pack-all.mjs';

const { registerXkv } = await import(join(ROOT, 'packages/xkv/dist/index.js'));
const { registerBaselines } = await import(join(ROOT, 'packages/baselines/dist/index.js'));
const { configJsonSchemas } = await import(join(ROOT, 'packages/bench/dist/index.js'));
registerXkv();
registerBaselines();
const dir = join(ROOT, 'packages/bench/schemas');
mkdirSync(dir, { recursive: true });
for (const [name, schema] of Object.entries(configJsonSchemas())) {
  writeFileSync(join(dir, name), `${JSON.stringify(schema, null, 2)}\n`);
  console.log(`wrote packages/bench/schemas/${name}`);
}
