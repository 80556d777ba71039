import { defineConfig } from 'tsup';
// @ts-expect-error a plain ESM helper without type declarations
import { browserBuild } from '../../scripts/tsup-browser.mjs';

export default defineConfig([
  {
    entry: ['src/index.ts'],
    format: ['esm', 'cjs'],
    dts: { entry: 'src/index.ts' },
    sourcemap: true,
    clean: ['!browser.js', '!browser.js.map'], // the browser build writes those
    target: 'node20',
  },
  // The browser build (export condition `browser`): Node built-ins replaced, see scripts/tsup-browser.mjs.
  browserBuild(),
]);
