// The browser builds: every package a page uses has a `browser` export condition whose bundle imports
// no Node built-in (scripts/tsup-browser.mjs replaces them with ./browser-shims); the shims that compute
// (SHA-256, path arithmetic) give Node's results.
import { createHash } from 'node:crypto';
import { builtinModules } from 'node:module';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, posix } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it, vi } from 'vitest';
// @ts-expect-error a plain ESM helper without type declarations
import { browserBuild } from './tsup-browser.mjs';
import { createHash as shimHash } from './browser-shims/crypto.js';
import * as shimPath from './browser-shims/path.js';

// The shims take KvpackError from a name the browser builds resolve to @kvpack/core.
vi.mock('kvpack-errors', () => import('../packages/core/src/errors.js'));

const root = fileURLToPath(new URL('..', import.meta.url));
const BROWSER_PACKAGES = ['core', 'strategy-utils', 'xkv', 'baselines', 'models'];
const builtins = new Set(builtinModules.flatMap((m) => [m, `node:${m}`]));

/** Module specifiers a bundle imports: static imports and exports, literal dynamic imports, requires. */
function specifiers(js: string): string[] {
  const out = new Set<string>();
  // esbuild writes static imports and re-exports at the start of a line (strings in messages may quote imports too).
  for (const re of [/^\s*(?:import|export)\b[^;'"]*?\bfrom\s*["']([^"']+)["']/gm, /^\s*import\s*["']([^"']+)["']/gm, /\bimport\(\s*(?:\/\*[^*]*\*\/\s*)?["']([^"']+)["']\s*\)/g, /\brequire\(\s*["']([^"']+)["']\s*\)/g])
    for (const m of js.matchAll(re)) out.add(m[1]);
  return [...out];
}

describe('browser builds', () => {
  const out = mkdtempSync(join(tmpdir(), 'kvpack-browser-'));
  afterAll(() => rmSync(out, { recursive: true, force: true }));

  for (const name of BROWSER_PACKAGES) {
    it(`@kvpack/${name}: the browser condition comes first, and its bundle imports no Node built-in`, async () => {
      const dir = join(root, 'packages', name);
      const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'));
      const dot = pkg.exports['.'];
      expect(Object.keys(dot)[0]).toBe('browser');
      expect(dot.browser).toEqual({ types: './dist/index.d.ts', default: './dist/browser.js' });
      // packageBuilds (scripts/tsup-browser.mjs) includes browserBuild.
      expect(readFileSync(join(dir, 'tsup.config.ts'), 'utf8')).toMatch(/\b(browserBuild|packageBuilds)\(/);

      // The bundle as the package's build makes it (same options), into a scratch folder.
      const { build } = await import('tsup');
      const opts = browserBuild({ core: name === 'core' });
      const external = [...Object.keys({ ...pkg.dependencies, ...pkg.peerDependencies })].map((d) => new RegExp(`^${d}(/|$)`));
      await build({ ...opts, entry: { browser: join(dir, 'src/index.ts') }, outDir: join(out, name), external, sourcemap: false, silent: true, config: false });
      const files = [join(out, name, 'browser.js'), ...(existsSync(join(dir, 'dist/browser.js')) ? [join(dir, 'dist/browser.js')] : [])];
      for (const f of files) {
        const js = readFileSync(f, 'utf8');
        const imported = specifiers(js);
        expect(imported.filter((s) => builtins.has(s)), f).toEqual([]);
        // Everything else it imports is a declared dependency (bundlers resolve those with their own browser conditions).
        expect(imported.filter((s) => !external.some((re) => re.test(s))), f).toEqual([]);
        expect(js).not.toMatch(/__vite-browser-external|\bBuffer\.(from|alloc)\(/);
      }
    });
  }

  it('the SHA-256 shim (model fingerprints) equals node:crypto, across block boundaries and split updates', () => {
    const r = (n: number, seed: number) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed * 17 + ((i * i) >> 3)) & 255);
    for (const n of [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, 70_001]) {
      const b = r(n, n);
      expect(shimHash('sha256').update(b).digest('hex'), `${n} bytes`).toBe(createHash('sha256').update(b).digest('hex'));
      const cut = Math.floor(n / 3);
      expect(shimHash('sha256').update(b.subarray(0, cut)).update('héllo ✓').update(b.subarray(cut)).digest('hex')).toBe(
        createHash('sha256').update(b.subarray(0, cut)).update('héllo ✓').update(b.subarray(cut)).digest('hex'),
      );
    }
    expect(shimHash('sha256').update('abc').digest('hex')).toBe('ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'); // FIPS 180-2 example
  });

  it('the path shim gives node:path (POSIX) results', () => {
    const paths = ['a/b/c.bin', '/a/b/', 'c', '/', '.hidden', 'x/y.tar.gz', 'a//b/../c/./d.json', '', 'dir/'];
    for (const p of paths) {
      if (p === '') continue;
      expect(shimPath.basename(p), p).toBe(posix.basename(p));
      expect(shimPath.dirname(p), p).toBe(posix.dirname(p));
      expect(shimPath.extname(p), p).toBe(posix.extname(p));
      expect(shimPath.isAbsolute(p), p).toBe(posix.isAbsolute(p));
      expect(shimPath.normalize(p), p).toBe(posix.normalize(p).replace(/(.)\/$/, '$1'));
    }
    expect(shimPath.basename('model.safetensors', '.safetensors')).toBe('model');
    for (const parts of [['a', 'b'], ['/a', '../b', 'c.json'], ['dir/', 'tokenizer.json'], ['a', '', 'b']]) expect(shimPath.join(...parts)).toBe(posix.join(...parts));
    for (const parts of [['/a', 'b'], ['/a', '/b', 'c'], ['/x/y', '../z']]) expect(shimPath.resolve(...parts)).toBe(posix.resolve(...parts));
  });
});
