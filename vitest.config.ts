import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

const pkgs = ['core', 'strategy-utils', 'xkv', 'baselines', 'models', 'bench', 'store'] as const;
const src = (p: string) => fileURLToPath(new URL(`./packages/${p}`, import.meta.url));
// Tests run against the TypeScript sources (no build needed).
const alias = [
  { find: /^@kvpack\/core\/conformance$/, replacement: `${src('core')}/src/conformance.ts` },
  { find: /^@kvpack\/strategy-utils\/internal$/, replacement: `${src('strategy-utils')}/src/internal.ts` },
  ...pkgs.map((p) => ({ find: new RegExp(`^@kvpack/${p}$`), replacement: `${src(p)}/src/index.ts` })),
];
const common = { environment: 'node', testTimeout: 180_000, hookTimeout: 180_000, pool: 'forks' } as const;

// Each package is its own vitest project (`npx vitest run --project core`); the runnable examples
// are one more, held to the same suites as the packages; `repo` checks the repository's shape.
export default defineConfig({
  resolve: { alias },
  test: {
    projects: [
      ...pkgs.map((p) => ({ resolve: { alias }, test: { name: p, root: src(p), include: ['src/**/*.test.ts'], ...common } })),
      {
        resolve: { alias },
        test: { name: 'examples', root: fileURLToPath(new URL('./examples', import.meta.url)), include: ['**/*.test.ts'], exclude: ['**/node_modules/**'], ...common },
      },
      { test: { name: 'repo', root: fileURLToPath(new URL('./scripts', import.meta.url)), include: ['*.test.ts'], ...common } },
    ],
  },
});
