import { defineConfig } from 'tsup';

export default defineConfig({
  entry: ['src/index.ts', 'src/conformance.ts'],
  format: ['esm', 'cjs'],
  dts: { entry: ['src/index.ts', 'src/conformance.ts'] },
  external: ['vitest'],
  sourcemap: true,
  clean: true,
  target: 'node20',
});
