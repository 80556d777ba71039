import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

declare const __filename: string;

/**
 * @kvpack/bench's version, read from its package.json (one folder above `dist/` and `src/`), so
 * that reports and `kvpack --version` follow releases. Loads nothing else: `kvpack --version`
 * answers without starting tfjs.
 */
export const KVPACK_VERSION: string = (() => {
  const metaUrl = (import.meta as { url?: string }).url;
  const here = typeof metaUrl === 'string' && metaUrl !== '' ? metaUrl : pathToFileURL(__filename).href;
  try {
    return (JSON.parse(readFileSync(new URL('../package.json', here), 'utf8')) as { version: string }).version;
  } catch {
    return '0.0.0-unknown';
  }
})();
