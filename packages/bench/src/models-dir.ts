import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Folders searched for a model named by a path relative to "the models folder", in order:
 * `$KVPACK_MODELS_DIR` when set (then only it); else the repository's embedded `models/` (stories260K
 * ships there), then `../shared/models` beside the repository.
 */
export function modelSearchDirs(): string[] {
  if (process.env.KVPACK_MODELS_DIR) return [resolve(process.env.KVPACK_MODELS_DIR)];
  const repoRoot = fileURLToPath(new URL('../../../', import.meta.url));
  return [resolve(repoRoot, 'models'), resolve(repoRoot, '..', 'shared', 'models')];
}

/** `rel` in the first of {@link modelSearchDirs} that holds it; else in the first of them (for the error message). */
export function resolveModelPath(rel: string): string {
  const dirs = modelSearchDirs();
  return dirs.map((d) => resolve(d, rel)).find((p) => existsSync(p)) ?? resolve(dirs[0], rel);
}
