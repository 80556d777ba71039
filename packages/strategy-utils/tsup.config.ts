import { defineConfig } from 'tsup';

export default defineConfig({
  entry: ['src/index.ts', 'src/internal.ts'],
  format: ['esm', 'cjs'],
  // Both entries share one copy of every module in CommonJS too (classes, registries, switches).
  splitting: true,
  shims: true,
  dts: { entry: ['src/index.ts', 'src/internal.ts'] },
  sourcemap: true,
  clean: true,
  target: 'node20',
});
