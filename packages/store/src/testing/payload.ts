// Deterministic stand-ins for serialized caches (real kvpack containers whose content is the prefix's
// token ids), so that a test or a load worker can tell a right record from a wrong one without a model.
import { decodeContainer, encodeContainer, mulberry32 } from '@kvpack/core';

export const TEST_MODEL = 'sha256:' + 'ab'.repeat(32);
export const TEST_STRATEGY = { name: 'prefix-test', options: { level: 1 } };

/** A container for the prefix `tokens`: its ids, and `padBytes` bytes that depend on them. */
export function prefixPayload(tokens: readonly number[], padBytes = 1024, model = TEST_MODEL): Uint8Array {
  const pad = new Uint8Array(padBytes);
  let h = 2166136261 >>> 0;
  for (const t of tokens) h = Math.imul(h ^ t, 16777619) >>> 0;
  for (let i = 0; i < padBytes; i++) {
    h = Math.imul(h ^ i, 16777619) >>> 0;
    pad[i] = h & 0xff;
  }
  return encodeContainer({
    strategy: TEST_STRATEGY.name,
    options: TEST_STRATEGY.options,
    model,
    meta: { tokens: tokens.length },
    tensors: [
      { name: 'ids', dtype: 'int32', shape: [tokens.length], data: Int32Array.from(tokens) },
      { name: 'pad', dtype: 'uint8', shape: [], data: pad },
    ],
  });
}

/** Whether `bytes` is exactly the payload of the first `length` tokens of `tokens`. */
export function isPayloadOf(bytes: Uint8Array, tokens: readonly number[], length: number, padBytes = 1024): boolean {
  const want = prefixPayload(tokens.slice(0, length), padBytes);
  if (want.length !== bytes.length) return false;
  for (let i = 0; i < want.length; i++) if (want[i] !== bytes[i]) return false;
  // An independent read of the ids, through the container decoder (CRC checked).
  const ids = decodeContainer(bytes).get('ids').data as Int32Array;
  return ids.length === length && ids.every((v, i) => v === tokens[i]);
}

/** A seeded generator (core's mulberry32). */
export const rng = mulberry32;

/** The load workers' shared documents: `docs` sequences of `chunks` chunks of C token ids. */
export function loadDocs(C: number, docs = 4, chunks = 8): number[][] {
  return Array.from({ length: docs }, (_, d) => {
    const r = rng(1000 + d);
    return Array.from({ length: chunks * C }, () => Math.floor(r() * 32000));
  });
}
