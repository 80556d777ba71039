// Shared by the browser shims of Node's file, process and addon APIs.
// @ts-expect-error resolved by the browser build (scripts/tsup-browser.mjs) to @kvpack/core's KvpackError
import { KvpackError } from 'kvpack-errors';

/** Throws the browser build's error for a Node-only API. */
export function unavailable(api: string): never {
  throw new KvpackError(
    'unsupported',
    `${api} is not available in the browser: pass the bytes instead (an ArrayBuffer, Blob, fetch Response or stream; see loadModelFromBytes / loadModelFromUrl)`,
  );
}
