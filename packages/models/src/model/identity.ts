import { createHash, type Hash } from 'node:crypto';
import * as tf from '@tensorflow/tfjs-core';
import { check } from '@kvpack/core';

/** The bytes of a float32 array (a view, no copy). */
function floatBytes(d: Float32Array): Uint8Array {
  return new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
}

/**
 * A model fingerprint's SHA-256 over `configText`, then every weight's `\n<name> <dtype> [<shape>]\n`
 * line and its float32 bytes from `data`; `extra` may add more before the digest. Returns `sha256:<hex>`.
 */
export function weightsDigest(configText: string, named: Iterable<[string, tf.Tensor]>, data: (t: tf.Tensor) => Uint8Array, extra?: (h: Hash) => void): string {
  const h = createHash('sha256');
  h.update(configText);
  for (const [name, t] of named) {
    h.update(`\n${name} ${t.dtype} [${t.shape}]\n`);
    h.update(data(t));
  }
  extra?.(h);
  return `sha256:${h.digest('hex')}`;
}

/** Reads every weight's float32 bytes asynchronously; returns the lookup {@link weightsDigest} takes. */
export async function readWeightBytes(named: Iterable<[string, tf.Tensor]>): Promise<(t: tf.Tensor) => Uint8Array> {
  const bytes = new Map<tf.Tensor, Uint8Array>();
  for (const [, t] of named) bytes.set(t, floatBytes((await t.data()) as Float32Array));
  return (t) => bytes.get(t)!;
}

/** A weight's float32 bytes by a synchronous readback (host backends). */
export function weightBytesSync(t: tf.Tensor): Uint8Array {
  return floatBytes(t.dataSync() as Float32Array);
}

/**
 * Throws unless ids is a non-empty array of integers in [0, V).
 * @throws KvpackError('shape') naming `what` and the first bad id.
 */
export function checkTokenIds(ids: readonly number[], V: number, what: string): void {
  check(Array.isArray(ids), 'shape', `${what}: token ids must be an array of integers`);
  check(ids.length > 0, 'shape', `${what}: no token ids`);
  for (let i = 0; i < ids.length; i++)
    check(Number.isInteger(ids[i]) && ids[i] >= 0 && ids[i] < V, 'shape', () => `${what}: token id ${ids[i]} at index ${i} is not an integer in [0, vocab ${V})`);
}

/**
 * Throws unless positions start … start + count − 1 fit a context of `max` tokens (`limit` names
 * the setting in the message).
 * @throws KvpackError('shape')
 */
export function checkPositionSpan(start: number, count: number, max: number, limit: string, what: string): void {
  check(Number.isInteger(start) && start >= 0, 'shape', `${what}: position ${start} must be an integer ≥ 0`);
  check(start + count <= max, 'shape', `${what}: ${count} tokens at positions ${start}..${start + count - 1} exceed the model's ${limit} ${max}`);
}
