import { unavailable } from './unavailable.js';

/** A `require` that refuses: native addons (Dawn, tfjs-node) do not exist in the browser. */
export function createRequire(): ((id: string) => never) & { resolve(id: string): never } {
  const req = (id: string): never => unavailable(`loading the Node addon ${id}`);
  req.resolve = (id: string): never => unavailable(`resolving the Node module ${id}`);
  return req;
}
