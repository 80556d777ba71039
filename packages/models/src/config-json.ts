import { check } from '@kvpack/core';
import { editDistance } from './bounds.js';

/** A parsed config.json object. */
export type Json = Record<string, unknown>;

/** A config.json key the loader neither reads nor knows to be irrelevant. */
export interface HfUnknownKey {
  key: string;
  /** The key read by the loader that this one most likely misspells (edit distance ≤ 2), if any. */
  suggestion?: string;
}

/**
 * A positive finite number (`fallback` when the key is absent or null).
 * @throws KvpackError('config') naming the key.
 */
export function positiveNumber(cfg: Json, key: string, file: string, fallback: number): number {
  const v = cfg[key] ?? fallback;
  check(typeof v === 'number' && Number.isFinite(v) && v > 0, 'config', `${file}: "${key}" must be a positive number, got ${JSON.stringify(cfg[key])}`);
  return v;
}

/** A token id (an integer, or the first of a list), else undefined. */
export function tokenId(v: unknown): number | undefined {
  if (Array.isArray(v)) return tokenId(v[0]);
  return Number.isInteger(v) ? (v as number) : undefined;
}

/**
 * The keys of a config.json object that are neither in `read` nor in `ignored`, each with the read
 * key it most likely misspells (edit distance ≤ 2).
 */
export function unknownConfigKeys(cfg: Json, read: ReadonlySet<string>, ignored: ReadonlySet<string>): HfUnknownKey[] {
  const out: HfUnknownKey[] = [];
  for (const key of Object.keys(cfg)) {
    if (read.has(key) || ignored.has(key)) continue;
    let best: string | undefined;
    let bestD = Infinity;
    for (const k of read) {
      if (Math.abs(k.length - key.length) > 2) continue;
      const d = editDistance(key.toLowerCase(), k);
      if (d < bestD) [bestD, best] = [d, k];
    }
    out.push(bestD <= 2 ? { key, suggestion: best } : { key });
  }
  return out;
}

/** Reports unknown config.json keys once, through `onWarning` (default `console.warn(message)`); nothing when there are none. */
export function warnUnknownKeys(unknown: HfUnknownKey[], file: string, onWarning?: (message: string, unknownKeys: HfUnknownKey[]) => void): void {
  if (!unknown.length) return;
  const list = unknown.map((u) => (u.suggestion ? `"${u.key}" (did you mean "${u.suggestion}"?)` : `"${u.key}"`)).join(', ');
  const msg = `${file}: ignoring ${unknown.length} key${unknown.length > 1 ? 's' : ''} kvpack does not understand: ${list}; settings they were meant to give take their defaults`;
  (onWarning ?? ((m: string) => console.warn(m)))(msg, unknown);
}
