import { defineConfig } from 'tsup';

export default defineConfig({
  entry: ['src/index.ts', 'src/conformance.ts'],
  format: ['esm', 'cjs'],
  // Both entries share one copy of every module in CommonJS too (classes, registries, switches).
  splitting: true,
  shims: true,
  dts: { entry: ['src/index.ts', 'src/conformance.ts'] },
  external: ['vitest'],
  sourcemap: true,
  clean: true,
  target: 'node20',
});
