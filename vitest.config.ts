import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

const pkgs = ['core', 'xkv', 'baselines', 'models', 'bench'] as const;
const alias = Object.fromEntries(
  pkgs.map((p) => [`@kvpack/${p}`, fileURLToPath(new URL(`./packages/${p}/src/index.ts`, import.meta.url))]),
);

// Tests run against the TypeScript sources (no build needed); each package is its own project.
export default defineConfig({
  resolve: { alias },
  test: {
    projects: pkgs.map((p) => ({
      resolve: { alias },
      test: {
        name: p,
        root: fileURLToPath(new URL(`./packages/${p}`, import.meta.url)),
        include: ['src/**/*.test.ts'],
        environment: 'node',
        testTimeout: 120_000,
        hookTimeout: 120_000,
        pool: 'forks',
      },
    })),
  },
});
