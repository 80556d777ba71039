// The browser build of a kvpack package: one ESM file, dist/browser.js, for the `browser` export
// condition. Node built-ins are replaced by the small modules in ./browser-shims: path arithmetic and
// SHA-256 work as in Node; file, process and native-addon APIs throw a KvpackError that says to pass
// bytes instead (every loader has a bytes form). A built-in without a shim fails the build.
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const shims = join(dirname(fileURLToPath(import.meta.url)), 'browser-shims');
const builtin = /^(node:)?(fs|fs\/promises|path|crypto|zlib|child_process|module|url|os|perf_hooks)$/;

/**
 * @param {{ entry?: string; core?: boolean }} opts `core`: the package is @kvpack/core itself, whose
 *   shims take KvpackError from its own source rather than from the package.
 */
export function browserBuild(opts = {}) {
  const entry = opts.entry ?? 'src/index.ts';
  return {
    entry: { browser: entry },
    format: ['esm'],
    platform: 'browser',
    removeNodeProtocol: false,
    target: 'es2022',
    dts: false,
    sourcemap: true,
    clean: false,
    splitting: false,
    esbuildPlugins: [
      {
        name: 'kvpack-browser-shims',
        setup(build) {
          build.onResolve({ filter: /^(node:)?[a-z_/]+$/ }, (args) => {
            const m = builtin.exec(args.path);
            if (!m) {
              if (/^node:/.test(args.path)) return { errors: [{ text: `no browser shim for ${args.path} (imported by ${args.importer})` }] };
              return undefined;
            }
            const file = join(shims, `${m[2].replace('/', '-')}.ts`);
            if (!existsSync(file)) return { errors: [{ text: `no browser shim for ${args.path} (imported by ${args.importer})` }] };
            return { path: file };
          });
          build.onResolve({ filter: /^kvpack-errors$/ }, () =>
            opts.core ? { path: join(shims, '../../packages/core/src/errors.ts') } : { path: '@kvpack/core', external: true },
          );
        },
      },
    ],
  };
}

/**
 * The two builds of a kvpack library package: ESM + CJS with type declarations for Node, then the
 * browser build above. With several entries, both share one copy of every module in CommonJS too
 * (classes, registries, switches).
 * @param {{ entries?: string[]; external?: string[]; core?: boolean }} opts `core` as for browserBuild.
 */
export function packageBuilds(opts = {}) {
  const entries = opts.entries ?? ['src/index.ts'];
  const split = entries.length > 1 ? { splitting: true, shims: true } : {};
  return [
    {
      entry: entries,
      format: ['esm', 'cjs'],
      ...split,
      dts: { entry: entries.length > 1 ? entries : entries[0] },
      ...(opts.external ? { external: opts.external } : {}),
      sourcemap: true,
      clean: ['!browser.js', '!browser.js.map'], // the browser build writes those
      target: 'node20',
    },
    browserBuild({ entry: entries[0], ...(opts.core ? { core: true } : {}) }),
  ];
}
