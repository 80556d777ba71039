import { KvpackError, check, cutCachePrefix, decodeContainer, deserializeCache, prefixCutter, type CompressedCache } from '@kvpack/core';
import type { StoreBackend } from './backend.js';
import { DEFAULT_CHUNK_TOKENS, chunkKeys, checkTokens, makeNamespace, stableJson, type Namespace } from './keys.js';
import { decodeAnyManifest, decodeRecord, encodeLinkManifest, encodeManifest, encodeRecord, isLink, RECORD_VERSION, type LinkManifest, type Manifest } from './record.js';

/** Why a stored prefix was not used although present. */
export type StoreWarningReason = 'corrupt' | 'truncated' | 'foreign' | 'backend';

/** A stored prefix that could not be used: reported once (per key and reason) and treated as a miss. */
export interface StoreWarning {
  reason: StoreWarningReason;
  /** The prefix key concerned ('' for a backend failure not tied to one key). */
  key: string;
  message: string;
}

/** Options of {@link PrefixStore}. */
export interface PrefixStoreOptions {
  backend: StoreBackend;
  /** Fingerprint of the model (`await LlamaModel.fingerprint()`). */
  model: string;
  /** The strategy whose caches are stored, at its resolved options (a `Strategy` from `createStrategy`, or `{ name, options }` as its caches record them). */
  strategy: { name: string; options: unknown };
  /** Tokens per chunk C (default 256). Prefixes are stored and found at multiples of C. */
  chunkTokens?: number;
  /** Seconds a stored prefix lives (Redis/Valkey `EX`; the manifest's `expires` elsewhere). Default: no expiry. */
  ttlSeconds?: number;
  /** Called once per key and reason for a record that is corrupt, truncated or foreign, and for backend failures. Default: `console.warn`. */
  onWarning?: (w: StoreWarning) => void;
}

/** A stored prefix found by {@link PrefixStore.lookup}. */
export interface PrefixHit {
  /** Tokens the prefix covers (a multiple of C). */
  tokens: number;
  key: string;
  /** The serialized cache (container v2), checked: record CRC, manifest, namespace, key. */
  cache: Uint8Array;
  /** Bytes of the whole record (header included). */
  recordBytes: number;
  /**
   * Present when the hit is a cut (lookup with `cut: true`): no record of this prefix is stored, and
   * `cache` is the serialized cache of this longer stored prefix that starts with it (its record's
   * chain names `key`), to be cut to `tokens` (`cutCachePrefix`; {@link PrefixStore.restore} does it).
   */
  source?: { key: string; tokens: number };
}

/** Counters of a {@link PrefixStore}, since it was made. */
export interface PrefixStoreStats {
  lookups: number;
  hits: number;
  misses: number;
  /** Tokens asked for (at chunk boundaries) and tokens found. */
  lookupTokens: number;
  hitTokens: number;
  /** Prefixes whose manifest was present but whose record was gone (evicted or expired). */
  evicted: number;
  /** Records refused as corrupt, truncated or foreign. */
  rejected: number;
  backendErrors: number;
  /** Hits served by cutting a longer stored prefix (a link manifest). */
  cutHits: number;
  /** Link manifests written (chunk boundaries a stored record covers that hold no record of their own). */
  links: number;
  /** Hits whose record was rewritten by a concurrent put of the same prefix after the manifest was read (a complete, valid record). */
  replaced: number;
  puts: number;
  putBytes: number;
}

/** What {@link PrefixStore.put} stored. */
export interface PutResult {
  key: string;
  tokens: number;
  /** Bytes of the record (envelope + serialized cache, every header included). */
  recordBytes: number;
  /** Link manifests written for shorter boundaries this record covers (0 when the strategy's caches cannot be cut). */
  links: number;
}

const WARNED_MAX = 10_000;

/**
 * A store of compressed prefix caches, after LMCache and vLLM's prefix caching: a token sequence is cut
 * into chunks of C tokens; the prefix ending at chunk i has the chained key i (see {@link chunkKeys}),
 * in a namespace made of the model fingerprint, the strategy name and its resolved options. Lookup
 * returns the longest stored prefix of a sequence; the caller restores it and prefills only the rest.
 *
 * **Stored unit.** Each key holds the whole serialized cache of its prefix (one record per chunk
 * boundary that was stored), not a slice of a longer cache: a cross-layer compressed cache (xKV's
 * shared per-group factors, fitted over all T tokens) cannot be cut into independent chunks, and two
 * prefixes sharing their first chunks are compressed differently. A record is therefore self-contained
 * and exact: restoring it gives the very cache that was stored, bit for bit.
 *
 * **Cut prefixes.** Where the strategy declares `cutPrefix` (xkv and svd with full decode, dense), a
 * record also serves the shorter prefixes it covers: it lists the chain keys of all its chunk
 * boundaries, and `put` writes a *link manifest* at each shorter boundary that holds no record
 * (pointing to the shortest stored record covering it). {@link restore} follows a link when no record
 * is stored at a longer boundary, checks that the record's chain holds the boundary's key, and cuts the
 * restored cache to that boundary (`cutCachePrefix`): the same numbers as that cache cut in-process.
 *
 * **Integrity.** A record is versioned and checksummed (CRC-32 over its header and the serialized
 * cache, whose own container CRC covers its JSON header) and names its key, namespace and length;
 * its manifest, written after it, says that a complete record is there. A corrupt, truncated or foreign record is reported once through `onWarning` and is a
 * miss; so is a record evicted from under its manifest (counted, not reported) and a backend failure.
 */
export class PrefixStore {
  readonly namespace: Namespace;
  readonly backend: StoreBackend;
  readonly ttlSeconds: number | undefined;
  private readonly warn: (w: StoreWarning) => void;
  private readonly warned = new Set<string>();
  private namespaceWritten = false;
  private readonly counters: PrefixStoreStats = {
    lookups: 0,
    hits: 0,
    misses: 0,
    lookupTokens: 0,
    hitTokens: 0,
    evicted: 0,
    rejected: 0,
    backendErrors: 0,
    replaced: 0,
    cutHits: 0,
    links: 0,
    puts: 0,
    putBytes: 0,
  };

  /** @throws KvpackError('config') for a missing model fingerprint or strategy, a bad chunk size or TTL. */
  constructor(options: PrefixStoreOptions) {
    this.backend = options.backend;
    this.namespace = makeNamespace(options.model, options.strategy?.name, options.strategy?.options, options.chunkTokens ?? DEFAULT_CHUNK_TOKENS);
    check(
      options.ttlSeconds === undefined || (Number.isFinite(options.ttlSeconds) && options.ttlSeconds > 0),
      'config',
      `prefix store: ttlSeconds must be a positive number, got ${options.ttlSeconds}`,
    );
    this.ttlSeconds = options.ttlSeconds;
    this.warn = options.onWarning ?? ((w) => console.warn(`kvpack store: ${w.message}`));
  }

  /** Tokens per chunk, C. */
  get chunkTokens(): number {
    return this.namespace.descriptor.chunkTokens;
  }

  /** The longest chunk boundary ≤ n: ⌊n / C⌋·C, the longest prefix of n tokens the store can hold. */
  alignedLength(n: number): number {
    return Math.floor(n / this.chunkTokens) * this.chunkTokens;
  }

  /** Chain keys of a token sequence's full chunks. */
  keys(tokens: readonly number[]): string[] {
    return chunkKeys(this.namespace, tokens);
  }

  /** Counters since the store was made (a copy). */
  stats(): PrefixStoreStats {
    return { ...this.counters };
  }

  private report(reason: StoreWarningReason, key: string, message: string): void {
    if (reason === 'backend') this.counters.backendErrors++;
    else this.counters.rejected++;
    const id = reason === 'backend' ? `backend:${message.replace(/[0-9a-f]{16}…/, '')}` : `${reason}:${key}`;
    if (this.warned.has(id)) return;
    if (this.warned.size >= WARNED_MAX) this.warned.clear();
    this.warned.add(id);
    this.warn({ reason, key, message });
  }

  /**
   * Stores the compressed cache of `tokens` (the prefix of a sequence, at a chunk boundary): the record
   * (listing the chain keys of every boundary it covers) first, then its manifest, then — where the
   * strategy's caches can be cut — link manifests at the shorter boundaries that hold no record (best
   * effort: a failed link write is reported, not thrown). The cache must hold exactly positions 0 … tokens.length − 1 of that
   * sequence (compressed prefill, and decode tokens appended exactly if any) — e.g. the cache a
   * session compressed from the prefill of these tokens.
   * @param cache a compressed cache, or its serialized bytes (`serializeAsync()` on webgpu)
   * @throws KvpackError('shape') when tokens.length is not a positive multiple of C or ids are bad, or
   *   the cache holds more tokens than given; KvpackError('model') when the cache comes from another
   *   model, strategy or options than the store's namespace (it cannot be stored under its keys);
   *   KvpackError('io') when the backend fails.
   */
  async put(tokens: readonly number[], cache: CompressedCache | Uint8Array): Promise<PutResult> {
    checkTokens(tokens, 'prefix store put');
    const C = this.chunkTokens;
    check(
      tokens.length > 0 && tokens.length % C === 0,
      'shape',
      `prefix store put: ${tokens.length} tokens is not a positive multiple of the chunk size ${C}; store the aligned prefix of ${this.alignedLength(tokens.length)} tokens`,
    );
    let bytes: Uint8Array;
    if (cache instanceof Uint8Array) bytes = cache;
    else {
      check(
        cache.tokenCount(0) <= tokens.length && cache.prefillLength <= tokens.length,
        'shape',
        `prefix store put: the cache holds ${cache.tokenCount(0)} tokens (prefill ${cache.prefillLength}), more than the ${tokens.length} given`,
      );
      bytes = cache.serialize();
    }
    const c = decodeContainer(bytes);
    const d = this.namespace.descriptor;
    check(
      c.model === d.model,
      'model',
      `prefix store put: the cache was made from ${c.model ? `model ${c.model}` : 'a cache without a model fingerprint'}, but this store's namespace is for model ${d.model}`,
    );
    check(c.strategy === d.strategy, 'model', `prefix store put: the cache is a ${c.strategy} cache, but this store's namespace is for ${d.strategy} caches`);
    check(
      stableJson(c.options) === stableJson(d.options),
      'model',
      () => `prefix store put: the cache's ${c.strategy} options ${stableJson(c.options)} are not this store's ${stableJson(d.options)}`,
    );
    const keys = chunkKeys(this.namespace, tokens);
    const key = keys[keys.length - 1];
    const created = Date.now();
    const rec = encodeRecord({ key, namespace: this.namespace.id, tokens: tokens.length, created, chain: keys }, bytes);
    const manifest: Manifest = {
      v: RECORD_VERSION,
      key,
      namespace: this.namespace.id,
      tokens: tokens.length,
      bytes: rec.bytes.length,
      crc: rec.crc,
      created,
      ...(this.ttlSeconds !== undefined ? { expires: created + this.ttlSeconds * 1000 } : {}),
    };
    const ttl = this.ttlSeconds !== undefined ? { ttlSeconds: this.ttlSeconds } : {};
    try {
      if (!this.namespaceWritten) {
        await this.backend.putNamespace(this.namespace.id, new TextEncoder().encode(stableJson(this.namespace.descriptor)));
        this.namespaceWritten = true;
      }
      // Replacing a stored prefix: its manifest goes first, so a crash between the two writes below
      // leaves a record without a manifest (a miss, removed by gc), never a manifest that describes
      // another record.
      if ((await this.backend.get(this.namespace.id, key, 'manifest')) !== null) await this.backend.remove(this.namespace.id, key);
      await this.backend.put(this.namespace.id, key, 'record', rec.bytes, ttl);
      await this.backend.put(this.namespace.id, key, 'manifest', encodeManifest(manifest), ttl);
    } catch (e) {
      if (e instanceof KvpackError) throw e;
      throw new KvpackError('io', `prefix store put: ${this.backend.location} failed: ${(e as Error).message}`, { cause: e });
    }
    this.counters.puts++;
    this.counters.putBytes += rec.bytes.length;
    const links = this.cuttable() ? await this.writeLinks(keys, { key, tokens: tokens.length, bytes: rec.bytes.length, crc: rec.crc }, created, ttl) : 0;
    return { key, tokens: tokens.length, recordBytes: rec.bytes.length, links };
  }

  private cutter: boolean | undefined;

  /** Whether this namespace's caches can be cut to a prefix (the strategy registered here declares `cutPrefix` for these options). */
  cuttable(): boolean {
    if (this.cutter === undefined) {
      const d = this.namespace.descriptor;
      try {
        this.cutter = typeof prefixCutter(d.strategy, d.options) === 'function';
      } catch {
        this.cutter = false; // not registered in this process: no links written, none followed
      }
    }
    return this.cutter;
  }

  /**
   * After a record of keys.length chunks: a link manifest at every shorter boundary that holds no
   * record manifest and no link to a record at most as long (the shortest covering record is the
   * cheapest to fetch). Best effort: the record is stored already; a failure is reported, not thrown.
   */
  private async writeLinks(keys: string[], link: LinkManifest['link'], created: number, ttl: { ttlSeconds?: number }): Promise<number> {
    const ns = this.namespace.id;
    const C = this.chunkTokens;
    const shorter = keys.slice(0, -1);
    const present = await Promise.allSettled(shorter.map((k) => this.backend.get(ns, k, 'manifest')));
    let written = 0;
    for (let i = 0; i < shorter.length; i++) {
      const r = present[i];
      if (r.status === 'rejected') continue;
      if (r.value) {
        try {
          const m = decodeAnyManifest(r.value);
          if (m.key === shorter[i] && m.namespace === ns && (!isLink(m) || m.link.tokens <= link.tokens)) continue;
        } catch {
          // A corrupt manifest: replaced by the link.
        }
      }
      const m: LinkManifest = {
        v: 2,
        key: shorter[i],
        namespace: ns,
        tokens: (i + 1) * C,
        created,
        ...(this.ttlSeconds !== undefined ? { expires: created + this.ttlSeconds * 1000 } : {}),
        link,
      };
      try {
        await this.backend.put(ns, shorter[i], 'manifest', encodeLinkManifest(m), ttl);
        written++;
      } catch (e) {
        this.report('backend', shorter[i], `writing link ${shorter[i].slice(0, 16)}… to ${this.backend.location} failed (the record is stored; only its shorter prefixes are not linked): ${(e as Error).message}`);
      }
    }
    this.counters.links += written;
    return written;
  }

  /**
   * The longest stored prefix of `tokens`, at most `maxTokens` long (default all of them; pass
   * tokens.length − 1 to keep a token to prefill). Manifests of every chunk boundary are read at once,
   * then records from the longest down until one checks out. With `cut: true` a boundary that only has
   * a link counts too: the hit's `source` then names the longer record whose bytes are returned, to be
   * cut to `tokens` (default false: every hit's bytes are exactly its prefix's cache). Never throws for what the backend holds:
   * a missing, expired, corrupt, truncated or foreign record, or a backend failure, is a miss (the
   * last three reported once through `onWarning`).
   * @throws KvpackError('shape') for token ids that are not integers in [0, 2^32).
   */
  async lookup(tokens: readonly number[], options: { maxTokens?: number; cut?: boolean } = {}): Promise<PrefixHit | null> {
    return this.lookupCounted(tokens, options.maxTokens, true, options.cut ?? false);
  }

  private async lookupCounted(tokens: readonly number[], maxTokens: number | undefined, count: boolean, cut: boolean): Promise<PrefixHit | null> {
    const C = this.chunkTokens;
    const maxChunks = Math.floor(Math.min(tokens.length, maxTokens ?? tokens.length) / C);
    const keys = chunkKeys(this.namespace, tokens, Math.max(0, maxChunks));
    if (count) {
      this.counters.lookups++;
      this.counters.lookupTokens += keys.length * C;
    }
    const hit = await this.find(keys, cut && this.cuttable());
    if (count) {
      if (hit) {
        this.counters.hits++;
        this.counters.hitTokens += hit.tokens;
      } else this.counters.misses++;
    }
    return hit;
  }

  private async find(keys: string[], cut: boolean): Promise<PrefixHit | null> {
    if (keys.length === 0) return null;
    const ns = this.namespace.id;
    // Every boundary's manifest at once (one round trip per node with auto-pipelining); a failure
    // (a node down) makes only those boundaries misses.
    const settled = await Promise.allSettled(keys.map((k) => this.backend.get(ns, k, 'manifest')));
    const manifests = settled.map((r, i) => {
      if (r.status === 'fulfilled') return r.value;
      this.report('backend', keys[i], `reading manifest ${keys[i].slice(0, 16)}… from ${this.backend.location} failed (a miss): ${(r.reason as Error)?.message ?? r.reason}`);
      return null;
    });
    const now = Date.now();
    for (let i = keys.length - 1; i >= 0; i--) {
      const raw = manifests[i];
      if (!raw) continue;
      const key = keys[i];
      const tokens = (i + 1) * this.chunkTokens;
      let m: Manifest | LinkManifest;
      try {
        m = decodeAnyManifest(raw);
        check(m.key === key && m.namespace === ns, 'model', `store manifest is foreign: it names key ${m.key.slice(0, 16)}… in namespace ${m.namespace}`);
        check(m.tokens === tokens, 'corrupt', `store manifest is corrupt: it declares ${m.tokens} tokens, its key names ${tokens}`);
      } catch (e) {
        this.reject(key, e);
        continue;
      }
      if (m.expires !== undefined && m.expires <= now) {
        this.counters.evicted++;
        continue;
      }
      if (isLink(m)) {
        if (!cut) continue;
        const hit = await this.followLink(m, i);
        if (hit) return hit;
        continue;
      }
      let rec: Uint8Array | null;
      try {
        rec = await this.backend.get(ns, key, 'record');
      } catch (e) {
        this.report('backend', key, `reading record ${key.slice(0, 16)}… from ${this.backend.location} failed (a miss): ${(e as Error).message}`);
        continue;
      }
      if (!rec) {
        this.counters.evicted++;
        continue;
      }
      try {
        const d = decodeRecord(rec, { key, namespace: ns, tokens });
        // Another writer stored the same prefix between this manifest and the record: the record is
        // complete (its own CRC holds) and is this key's, so it is used.
        if (d.crc !== m.crc) this.counters.replaced++;
        return { tokens, key, cache: d.payload, recordBytes: rec.length };
      } catch (e) {
        this.reject(key, e);
      }
    }
    return null;
  }

  /** The record a link names, checked (CRC, key, namespace, length, and that its chain holds this boundary's key), or null (a miss). */
  private async followLink(m: LinkManifest, i: number): Promise<PrefixHit | null> {
    const ns = this.namespace.id;
    const C = this.chunkTokens;
    let rec: Uint8Array | null;
    try {
      rec = await this.backend.get(ns, m.link.key, 'record');
    } catch (e) {
      this.report('backend', m.link.key, `reading record ${m.link.key.slice(0, 16)}… from ${this.backend.location} failed (a miss): ${(e as Error).message}`);
      return null;
    }
    if (!rec) {
      this.counters.evicted++;
      return null;
    }
    try {
      const d = decodeRecord(rec, { key: m.link.key, namespace: ns, tokens: m.link.tokens });
      const chain = d.header.chain;
      check(
        chain !== undefined && chain.length * C === d.header.tokens && chain[i] === m.key,
        'model',
        `store record ${m.link.key.slice(0, 16)}… does not cover prefix ${m.key.slice(0, 16)}… (its chain does not hold that key at chunk ${i})`,
      );
      if (d.crc !== m.link.crc) this.counters.replaced++;
      return { tokens: m.tokens, key: m.key, cache: d.payload, recordBytes: rec.length, source: { key: m.link.key, tokens: d.header.tokens } };
    } catch (e) {
      this.reject(m.link.key, e);
      return null;
    }
  }

  private reject(key: string, e: unknown): void {
    const reason: StoreWarningReason =
      e instanceof KvpackError ? (e.code === 'truncated' ? 'truncated' : e.code === 'model' ? 'foreign' : 'corrupt') : 'corrupt';
    this.report(reason, key, `prefix ${key.slice(0, 16)}… in ${this.backend.location} is not used (a miss): ${(e as Error).message}`);
  }

  /**
   * {@link lookup}, then restores the hit (`deserializeCache(bytes, { model })`: import the strategy's
   * package first so that it is registered); a hit through a link (`cut`, default true) is cut to its
   * boundary (`cutCachePrefix`; `cutFrom` says from how many tokens). A record that checks out but does
   * not restore is reported and the next shorter prefix is tried. The caller disposes the cache.
   * @returns the restored cache and the tokens it covers, or null on a miss
   */
  async restore(tokens: readonly number[], options: { maxTokens?: number; cut?: boolean } = {}): Promise<{ tokens: number; key: string; cache: CompressedCache; cutFrom?: number } | null> {
    let max = Math.min(tokens.length, options.maxTokens ?? tokens.length);
    this.counters.lookups++;
    this.counters.lookupTokens += Math.floor(max / this.chunkTokens) * this.chunkTokens;
    for (;;) {
      const hit = await this.lookupCounted(tokens, max, false, options.cut ?? true);
      if (!hit) {
        this.counters.misses++;
        return null;
      }
      try {
        let cache = deserializeCache(hit.cache, { model: this.namespace.descriptor.model });
        if (hit.source) {
          const whole = cache;
          try {
            cache = await cutCachePrefix(whole, hit.tokens);
          } finally {
            whole.dispose();
          }
          this.counters.cutHits++;
        }
        this.counters.hits++;
        this.counters.hitTokens += hit.tokens;
        return { tokens: hit.tokens, key: hit.key, cache, ...(hit.source ? { cutFrom: hit.source.tokens } : {}) };
      } catch (e) {
        this.reject(hit.source?.key ?? hit.key, e);
        max = hit.tokens - this.chunkTokens;
      }
    }
  }

  /** Removes the stored prefix of exactly these tokens (a chunk-aligned length). @returns whether one was there */
  async remove(tokens: readonly number[]): Promise<boolean> {
    const keys = chunkKeys(this.namespace, tokens);
    check(keys.length > 0 && tokens.length % this.chunkTokens === 0, 'shape', `prefix store remove: ${tokens.length} tokens is not a positive multiple of the chunk size ${this.chunkTokens}`);
    return this.backend.remove(this.namespace.id, keys[keys.length - 1]);
  }
}
