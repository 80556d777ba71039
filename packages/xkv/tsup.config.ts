import { defineConfig } from 'tsup';
// @ts-expect-error a plain ESM helper without type declarations
import { packageBuilds } from '../../scripts/tsup-browser.mjs';

// ESM + CJS for Node and the browser build (export condition `browser`), see scripts/tsup-browser.mjs.
export default defineConfig(packageBuilds());
