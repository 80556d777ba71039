// The shape of the repository: a strategy package (one that registers strategies) never depends on,
// nor imports, another strategy package; what strategies share lives in @kvpack/strategy-utils.
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const root = fileURLToPath(new URL('..', import.meta.url));

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    if (f === 'node_modules' || f === 'dist') return [];
    return statSync(p).isDirectory() ? files(p) : /\.(ts|mts|cts|js|mjs)$/.test(f) ? [p] : [];
  });
}

interface Pkg {
  name: string;
  dir: string;
  deps: string[];
  sources: string[];
}

// The published packages; examples/ is an application that uses them all.
const packages: Pkg[] = readdirSync(join(root, 'packages')).map((d) => join(root, 'packages', d)).map((dir) => {
  const j = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'));
  return { name: j.name, dir, deps: Object.keys({ ...j.dependencies, ...j.devDependencies, ...j.peerDependencies }), sources: files(dir) };
});

/** A module-level registration: `registerStrategy(`, or a `defineStrategy(` / `defineEvictionStrategy(` definition. */
const REGISTERS = /^(export const \w+ = )?(registerStrategy|defineStrategy|defineEvictionStrategy)\(/m;

/** Packages whose own sources register strategies (core's `dense` reference aside: core is the interface every package uses). */
const strategyPackages = packages.filter((p) => p.name !== '@kvpack/core' && p.sources.some((f) => !f.endsWith('.test.ts') && REGISTERS.test(readFileSync(f, 'utf8'))));

describe('import graph', () => {
  it('finds the strategy packages', () => {
    expect(strategyPackages.map((p) => p.name).sort()).toEqual(['@kvpack/baselines', '@kvpack/xkv']);
  });

  for (const p of strategyPackages) {
    const siblings = strategyPackages.filter((q) => q !== p).map((q) => q.name);
    it(`${p.name} neither depends on nor imports another strategy package`, () => {
      expect(p.deps.filter((d) => siblings.includes(d))).toEqual([]);
      const offending = p.sources.flatMap((f) => {
        const text = readFileSync(f, 'utf8');
        return siblings.filter((s) => new RegExp(`(from|import|require\\()\\s*\\(?['"]${s}(/[^'"]*)?['"]`).test(text)).map((s) => `${f.slice(root.length)} → ${s}`);
      });
      expect(offending).toEqual([]);
    });
  }
});
