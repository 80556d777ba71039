// Packs every publishable package (pnpm pack: workspace:^ ranges become real versions, prepack builds)
// into one folder and returns the tarballs by package name. Used by check-publish.mjs and pack-smoke.mjs.
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

export const ROOT = resolve(import.meta.dirname, '..');

/** Workspace packages under packages/ that are published (not private), in dependency order. */
export function publishablePackages() {
  const order = ['core', 'strategy-utils', 'models', 'xkv', 'baselines', 'bench'];
  const dirs = readdirSync(join(ROOT, 'packages')).sort((a, b) => (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99));
  return dirs
    .map((d) => ({ dir: join(ROOT, 'packages', d), pkg: JSON.parse(readFileSync(join(ROOT, 'packages', d, 'package.json'), 'utf8')) }))
    .filter((p) => !p.pkg.private);
}

/** Packs each package into `dest`; returns [{ name, version, dir, tarball }]. */
export function packAll(dest) {
  mkdirSync(dest, { recursive: true });
  return publishablePackages().map(({ dir, pkg }) => {
    const out = execFileSync('pnpm', ['pack', '--pack-destination', dest], { cwd: dir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
    const tgz = out.trim().split('\n').filter((l) => l.endsWith('.tgz')).pop();
    if (!tgz) throw new Error(`pnpm pack printed no tarball for ${pkg.name}:\n${out}`);
    return { name: pkg.name, version: pkg.version, dir, tarball: resolve(dest, tgz.split('/').pop()) };
  });
}
