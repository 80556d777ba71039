import { KvpackError, check } from '@kvpack/core';
import type { StoreBackend } from './backend.js';
import { KEY_PATTERN, type NamespaceDescriptor } from './keys.js';
import { decodeAnyManifest, decodeRecord, isLink, type LinkManifest, type Manifest } from './record.js';

/** State of one stored key, as {@link inspectStore} finds it. */
/**
 * State of one stored key: `link` — a link manifest (no record of its own; a longer stored prefix's
 * record covers it and is cut on lookup); `link-without-record` — a link whose record is gone.
 */
export type EntryStatus = 'ok' | 'link' | 'expired' | 'corrupt' | 'record-without-manifest' | 'manifest-without-record' | 'link-without-record';

/** One stored key of a namespace, checked. */
export interface InspectedEntry {
  namespace: string;
  key: string;
  status: EntryStatus;
  /** Tokens of the prefix (from its manifest, or its record when the manifest is gone). */
  tokens?: number;
  recordBytes?: number;
  created?: number;
  expires?: number;
  /** Why it is corrupt. */
  problem?: string;
  /** For a link: the key of the longer stored prefix whose record covers this one. */
  link?: string;
}

/** A namespace and its descriptor (null when the descriptor is missing or unreadable). */
export interface InspectedNamespace {
  id: string;
  descriptor: NamespaceDescriptor | null;
}

/** Reads a namespace's descriptor, or null. */
export async function readNamespace(backend: StoreBackend, id: string): Promise<NamespaceDescriptor | null> {
  const raw = await backend.getNamespace(id);
  if (!raw) return null;
  try {
    return JSON.parse(new TextDecoder().decode(raw)) as NamespaceDescriptor;
  } catch {
    return null;
  }
}

/**
 * Every key of every namespace (or of one), each checked: its manifest parsed, its record read and
 * verified against it (`verify`, default true: reads every record).
 */
export async function* inspectStore(backend: StoreBackend, options: { namespace?: string; verify?: boolean; now?: number } = {}): AsyncIterable<InspectedEntry> {
  const now = options.now ?? Date.now();
  const spaces = options.namespace ? [options.namespace] : await backend.namespaces();
  const linked = new Map<string, boolean>();
  for (const ns of spaces) {
    for await (const e of backend.entries(ns)) {
      const out: InspectedEntry = { namespace: ns, key: e.key, status: 'ok', ...(e.recordBytes !== undefined ? { recordBytes: e.recordBytes } : {}) };
      let m: Manifest | undefined;
      let link: LinkManifest | undefined;
      if (e.parts.includes('manifest')) {
        const raw = await backend.get(ns, e.key, 'manifest');
        if (raw) {
          try {
            const any = decodeAnyManifest(raw);
            if (isLink(any)) link = any;
            else m = any;
            out.tokens = any.tokens;
            out.created = any.created;
            if (any.expires !== undefined) out.expires = any.expires;
            check(any.key === e.key && any.namespace === ns, 'model', 'its manifest names another key or namespace');
          } catch (err) {
            out.status = 'corrupt';
            out.problem = (err as Error).message;
          }
        }
      }
      if (link && out.status === 'ok') {
        // A link: its own key holds no record. One found there was written, then its manifest replaced
        // by the link in a race: the key counts as a record without a manifest (gc removes it after the
        // grace period; lookups are served by the cut meanwhile, and the next covering put relinks it).
        out.link = link.link.key;
        out.status = link.expires !== undefined && link.expires <= now ? 'expired' : e.parts.includes('record') ? 'record-without-manifest' : 'link';
        if (out.status === 'link' && (options.verify ?? true)) {
          const target = `${ns}/${link.link.key}`;
          if (!linked.has(target)) linked.set(target, (await backend.get(ns, link.link.key, 'record')) !== null);
          if (!linked.get(target)) out.status = 'link-without-record';
        }
        yield out;
        continue;
      }
      const hasRecord = e.parts.includes('record');
      if (out.status === 'ok' && !m) out.status = 'record-without-manifest';
      else if (out.status === 'ok' && !hasRecord) out.status = 'manifest-without-record';
      else if (out.status === 'ok' && m!.expires !== undefined && m!.expires <= now) out.status = 'expired';
      if ((options.verify ?? true) && hasRecord && (out.status === 'ok' || out.status === 'record-without-manifest')) {
        const rec = await backend.get(ns, e.key, 'record');
        if (!rec) {
          if (out.status === 'ok') out.status = 'manifest-without-record';
        } else {
          out.recordBytes = rec.length;
          try {
            const d = decodeRecord(rec, { key: e.key, namespace: ns });
            out.tokens ??= d.header.tokens;
            out.created ??= d.header.created;
            if (m) {
              check(rec.length === m.bytes && d.crc === m.crc, 'corrupt', 'the record does not match its manifest (length or CRC-32)');
              check(d.header.tokens === m.tokens, 'corrupt', 'the record and its manifest disagree on the token count');
            }
          } catch (err) {
            out.status = 'corrupt';
            out.problem = (err as Error).message;
          }
        }
      }
      yield out;
    }
  }
}

/** Finds the one key (of any namespace) starting with `prefix` (at least 8 hex digits). */
export async function resolveKey(backend: StoreBackend, prefix: string): Promise<{ namespace: string; key: string }> {
  const p = prefix.toLowerCase();
  check(/^[0-9a-f]{8,64}$/.test(p), 'config', `"${prefix}" is not a prefix key: give at least 8 of its 64 hex digits`);
  const found: { namespace: string; key: string }[] = [];
  for (const ns of await backend.namespaces()) for await (const e of backend.entries(ns)) if (e.key.startsWith(p)) found.push({ namespace: ns, key: e.key });
  if (found.length === 0) throw new KvpackError('config', `no stored prefix has a key starting with ${p} in ${backend.location}`);
  if (found.length > 1) throw new KvpackError('config', `${found.length} stored prefixes have keys starting with ${p}; give more digits`);
  return found[0];
}

/**
 * The serialized cache of a stored prefix, checked (record CRC, key, namespace; its manifest when present).
 * @throws KvpackError('config') for an unknown or ambiguous key; KvpackError('corrupt' | 'truncated' | 'model') for a bad record.
 */
export async function readStoredCache(backend: StoreBackend, keyPrefix: string): Promise<{ namespace: string; key: string; tokens: number; cache: Uint8Array }> {
  const { namespace, key } = await resolveKey(backend, keyPrefix);
  const rec = await backend.get(namespace, key, 'record');
  if (!rec) {
    const raw = await backend.get(namespace, key, 'manifest');
    const link = raw ? (() => { try { const a = decodeAnyManifest(raw); return isLink(a) ? a : null; } catch { return null; } })() : null;
    if (link)
      throw new KvpackError(
        'config',
        `stored prefix ${key} is a link: its ${link.tokens} tokens are served by cutting the longer record ${link.link.key} (get that key; a lookup with cut restores this prefix)`,
      );
    throw new KvpackError('config', `stored prefix ${key} has no record (evicted, or an interrupted write)`);
  }
  check(KEY_PATTERN.test(key), 'config', `bad key ${key}`);
  const d = decodeRecord(rec, { key, namespace });
  const rawManifest = await backend.get(namespace, key, 'manifest');
  const any = rawManifest ? decodeAnyManifest(rawManifest) : null;
  if (any && !isLink(any)) {
    const m = any;
    check(m.bytes === rec.length && m.crc === d.crc, 'corrupt', `stored prefix ${key}: the record does not match its manifest (length or CRC-32)`);
  }
  return { namespace, key, tokens: d.header.tokens, cache: d.payload };
}

/** What {@link collectGarbage} removed. */
export interface GcResult {
  expired: number;
  corrupt: number;
  recordsWithoutManifest: number;
  manifestsWithoutRecord: number;
  /** Link manifests whose record is gone. */
  linksWithoutRecord: number;
  temporaryFiles: number;
  kept: number;
}

/**
 * Removes what no lookup can use: expired prefixes and links, corrupt records, manifests and links
 * whose record is gone (evicted), records without a manifest older than `graceMs` (default 60 s: younger ones may be a
 * write in progress, whose manifest comes next), and temporary files of interrupted writes.
 */
export async function collectGarbage(backend: StoreBackend, options: { graceMs?: number; now?: number; dryRun?: boolean } = {}): Promise<GcResult> {
  const now = options.now ?? Date.now();
  const grace = options.graceMs ?? 60_000;
  const r: GcResult = { expired: 0, corrupt: 0, recordsWithoutManifest: 0, manifestsWithoutRecord: 0, linksWithoutRecord: 0, temporaryFiles: 0, kept: 0 };
  for await (const e of inspectStore(backend, { now })) {
    let remove = true;
    if (e.status === 'ok' || e.status === 'link') remove = false;
    else if (e.status === 'record-without-manifest' && now - (e.created ?? 0) < grace) remove = false;
    if (!remove) {
      r.kept++;
      continue;
    }
    if (!options.dryRun) await backend.remove(e.namespace, e.key);
    if (e.status === 'expired') r.expired++;
    else if (e.status === 'corrupt') r.corrupt++;
    else if (e.status === 'record-without-manifest') r.recordsWithoutManifest++;
    else if (e.status === 'link-without-record') r.linksWithoutRecord++;
    else r.manifestsWithoutRecord++;
  }
  if (backend.sweepTemporary && !options.dryRun) r.temporaryFiles = await backend.sweepTemporary(grace);
  return r;
}
