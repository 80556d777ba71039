import { defineConfig } from 'tsup';

export default defineConfig([
  {
    // The library: ESM + CJS with type declarations.
    entry: ['src/index.ts'],
    format: ['esm', 'cjs'],
    dts: { entry: 'src/index.ts' },
    sourcemap: true,
    clean: true,
    target: 'node20',
  },
  {
    // The `kvpack` executable: ESM only (package "type": "module"); src/cli.ts starts with the
    // #!/usr/bin/env node line, which esbuild keeps at the top of dist/cli.js.
    entry: ['src/cli.ts'],
    format: ['esm'],
    sourcemap: true,
    clean: false,
    target: 'node20',
  },
]);
