import { createRequire } from 'node:module';
import { dirname, isAbsolute, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { KvpackError, readConfigFile } from '@kvpack/core';
import { z } from 'zod';

/** The `plugins:` key of a bench or accuracy config: modules that register strategies when imported. */
export const PluginsSchema = z
  .array(z.string().min(1))
  .describe(
    'Modules imported before the strategies are checked, so that third-party strategies register: package names (resolved from the config file\'s folder) or paths relative to it.',
  );

/**
 * Resolves a plugin specifier from `baseDir`: a relative or absolute path, or a package name looked
 * up from `baseDir`'s node_modules, then from the working directory's.
 * @throws KvpackError('config') when it cannot be found.
 */
export function resolvePlugin(spec: string, baseDir: string): string {
  if (spec.startsWith('.') || isAbsolute(spec)) return pathToFileURL(resolve(baseDir, spec)).href;
  for (const from of [baseDir, process.cwd()]) {
    try {
      return pathToFileURL(createRequire(resolve(from, 'noop.js')).resolve(spec)).href;
    } catch {
      /* try the next folder */
    }
  }
  throw new KvpackError('config', `plugin "${spec}" not found from ${baseDir} or the working directory (install it: npm i ${spec})`);
}

/**
 * Imports the `plugins:` modules named in a config file (its strategies register on import), before
 * the config's strategies are checked against the registry. Returns the specifiers imported.
 * A module exporting a `register()` function has it called too (explicit registration, idempotent).
 * @throws KvpackError('config') when a plugin cannot be found or fails to load.
 */
export async function loadConfigPlugins(configPath: string): Promise<string[]> {
  const abs = resolve(configPath);
  let raw: unknown;
  try {
    raw = readConfigFile(abs);
  } catch {
    return []; // the config loader reports unreadable files with their own message
  }
  const plugins = raw && typeof raw === 'object' && 'plugins' in raw ? (raw as { plugins: unknown }).plugins : undefined;
  if (plugins === undefined) return [];
  const r = PluginsSchema.safeParse(plugins);
  if (!r.success) throw new KvpackError('config', `${abs}: plugins must be a list of module names or paths`);
  for (const spec of r.data) {
    const url = resolvePlugin(spec, dirname(abs));
    try {
      const mod = (await import(url)) as { register?: unknown };
      if (typeof mod.register === 'function') (mod.register as () => void)();
    } catch (e) {
      throw new KvpackError('config', `plugin "${spec}" failed to load: ${(e as Error).message}`, { cause: e });
    }
  }
  return r.data;
}
