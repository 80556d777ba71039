import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import '@kvpack/xkv';
import '@kvpack/baselines';
import { configJsonSchemas } from './schemas.js';

type Json = Record<string, unknown>;

/** Paths of object properties (at any depth, through arrays and unions) that carry no description. */
function undocumented(s: Json, path = '$'): string[] {
  const out: string[] = [];
  for (const [k, p] of Object.entries((s.properties as Record<string, Json>) ?? {})) {
    if (typeof p.description !== 'string' || !p.description) out.push(`${path}.${k}`);
    out.push(...undocumented(p, `${path}.${k}`));
  }
  if (s.items) out.push(...undocumented(s.items as Json, `${path}[]`));
  for (const key of ['anyOf', 'oneOf'] as const) for (const [i, b] of ((s[key] as Json[]) ?? []).entries()) out.push(...undocumented(b, `${path}|${i}`));
  return out;
}

describe('config JSON Schemas', () => {
  const schemas = configJsonSchemas();
  const dir = resolve(import.meta.dirname, '../schemas');

  it('the shipped files are the generated ones (regenerate: pnpm build && node scripts/gen-schemas.mjs)', () => {
    for (const [name, schema] of Object.entries(schemas)) expect(JSON.parse(readFileSync(resolve(dir, name), 'utf8'))).toEqual(schema);
  });

  it('describe every field of the bench and accuracy configs', () => {
    expect(undocumented(schemas['bench-config.schema.json'])).toEqual([]);
    expect(undocumented(schemas['accuracy-config.schema.json'])).toEqual([]);
    const bench = schemas['bench-config.schema.json'] as { properties: Record<string, Json>; required: string[] };
    expect(bench.required).toEqual(expect.arrayContaining(['model', 'prompts', 'strategies']));
    expect(bench.properties.decodeTokens).toMatchObject({ type: 'integer', minimum: 0, maximum: 2 ** 20, default: 32 });
  });

  it('the strategy config has one branch per registered strategy, with its option bounds and defaults', () => {
    const s = schemas['strategy-config.schema.json'] as { oneOf: { properties: { name: { const: string }; options: { properties: Record<string, Json> } } }[] };
    const byName = new Map(s.oneOf.map((b) => [b.properties.name.const, b.properties.options]));
    expect([...byName.keys()]).toEqual(expect.arrayContaining(['dense', 'xkv', 'svd', 'kivi', 'quant', 'minicache', 'streamingllm', 'snapkv']));
    expect(byName.get('xkv')!.properties.rankK).toMatchObject({ type: 'integer', exclusiveMinimum: 0, default: 16 });
    // bits has no schema default since a targetRatio may resolve it (2 when neither is given).
    expect(byName.get('kivi')!.properties.residualLength).toMatchObject({ default: 128 });
    for (const n of ['kivi', 'quant', 'snapkv', 'streamingllm', 'minicache', 'svd', 'xkv', 'stacked', 'adakv', 'pyramidkv', 'expected-attention', 'kvzip', 'turboquant']) {
      expect(byName.get(n)!.properties.targetRatio).toMatchObject({ type: 'number', minimum: 1 });
      expect(byName.get(n)!.properties.compressionRatio).toMatchObject({ type: 'number', minimum: 0, exclusiveMaximum: 1 });
    }
    for (const b of s.oneOf) {
      const props = (b as unknown as { properties: Record<string, Json> }).properties;
      expect(props.name.description).toBeTruthy();
      expect(props.options.description).toBeTruthy();
    }
    // Every strategy's option schema describes every field.
    for (const name of ['dense', 'xkv', 'svd', 'quant', 'kivi', 'minicache', 'snapkv', 'streamingllm', 'adakv', 'pyramidkv', 'expected-attention', 'turboquant', 'kvzip']) expect(undocumented(byName.get(name) as unknown as Json), name).toEqual([]);
  });
});
