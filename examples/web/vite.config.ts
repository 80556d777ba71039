/**
 * The browser example's build. The @kvpack packages come from their sources (the page builds in a
 * fresh clone, before `pnpm build`), with Node built-ins replaced exactly as in the packages' browser
 * builds (scripts/tsup-browser.mjs, scripts/browser-shims). A page that imports the published
 * packages needs none of this: their `browser` export condition picks dist/browser.js.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { defineConfig, type Plugin } from 'vite';

const repo = fileURLToPath(new URL('../../', import.meta.url));
const pkgs = ['core', 'strategy-utils', 'xkv', 'baselines', 'models'];
const builtin = /^(node:)?(fs|fs\/promises|path|crypto|zlib|child_process|module|url|os|perf_hooks)$/;

function browserShims(): Plugin {
  return {
    name: 'kvpack-browser-shims',
    enforce: 'pre',
    resolveId(id) {
      if (id === 'kvpack-errors') return `${repo}packages/core/src/errors.ts`;
      const m = builtin.exec(id);
      if (!m) return null;
      const file = `${repo}scripts/browser-shims/${m[2].replace('/', '-')}.ts`;
      if (!existsSync(file)) this.error(`no browser shim for ${id}`);
      return file;
    },
  };
}

export default defineConfig({
  root: fileURLToPath(new URL('.', import.meta.url)),
  base: './',
  plugins: [browserShims()],
  resolve: {
    alias: pkgs.map((p) => ({ find: new RegExp(`^@kvpack/${p}$`), replacement: `${repo}packages/${p}/src/index.ts` })),
  },
  // tfjs-backend-wasm's threaded build needs SharedArrayBuffer: a cross-origin isolated page.
  server: { headers: { 'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp' } },
  preview: { headers: { 'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp' } },
  // Not minified: tfjs-backend-wasm starts its threads from the source text of its module factory,
  // which minification leaves naming variables of the enclosing bundle ("e is not defined" in workers).
  build: { outDir: 'dist', emptyOutDir: true, target: 'es2022', minify: false, chunkSizeWarningLimit: 4096, assetsInlineLimit: 0 },
});
