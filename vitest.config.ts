import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

const pkgs = ['core', 'strategy-utils', 'xkv', 'baselines', 'models', 'bench'] as const;
const src = (p: string) => fileURLToPath(new URL(`./packages/${p}`, import.meta.url));
// Tests run against the TypeScript sources (no build needed).
const alias = [
  { find: /^@kvpack\/core\/conformance$/, replacement: `${src('core')}/src/conformance.ts` },
  { find: /^@kvpack\/strategy-utils\/internal$/, replacement: `${src('strategy-utils')}/src/internal.ts` },
  ...pkgs.map((p) => ({ find: new RegExp(`^@kvpack/${p}$`), replacement: `${src(p)}/src/index.ts` })),
];

// Each package is its own vitest project: `npx vitest run --project core`.
export default defineConfig({
  resolve: { alias },
  test: {
    projects: pkgs.map((p) => ({
      resolve: { alias },
      test: {
        name: p,
        root: src(p),
        include: ['src/**/*.test.ts'],
        environment: 'node',
        testTimeout: 180_000,
        hookTimeout: 180_000,
        pool: 'forks',
      },
    })),
  },
});
