import { Cluster, Redis, type ClusterOptions, type RedisOptions } from 'ioredis';
import { KvpackError, check } from '@kvpack/core';
import type { PutObjectOptions, StoreBackend, StoreEntry, StorePart } from './backend.js';
import { KEY_PATTERN, NAMESPACE_PATTERN } from './keys.js';

const SUFFIX: Record<StorePart, string> = { record: 'r', manifest: 'm' };

/** Options of {@link RedisBackend}. */
export interface RedisBackendOptions {
  /** Seed nodes, `host:port` (one for a single server; any of a Redis Cluster's for a cluster). */
  nodes: { host: string; port: number }[];
  /** Talk Redis Cluster (slot routing, MOVED/ASK) instead of one server. */
  cluster?: boolean;
  /** Prefix of every key (default `kvpack`). */
  keyPrefix?: string;
  /** Database number (single server only). */
  db?: number;
  username?: string;
  password?: string;
  /** TLS (`rediss://`). */
  tls?: boolean;
  /** Milliseconds before a command fails (default 2,000): a stopped node makes a lookup a miss, not a hang. */
  commandTimeoutMs?: number;
}

/**
 * Redis and Valkey, through ioredis (single server or Redis Cluster). Keys:
 * `<prefix>:<namespace>:{<key>}:r` (record), `<prefix>:<namespace>:{<key>}:m` (manifest) and
 * `<prefix>:<namespace>:ns` (namespace descriptor). The hash tag `{<key>}` puts a prefix's record and
 * manifest in one cluster slot (so both are removed with one `DEL`, and are served by the same node),
 * while different prefixes spread over the cluster's masters. Records are written before their
 * manifests with `SET … EX ttl` when a TTL is set; `maxmemory` eviction may drop either part at any
 * time, and a prefix with a missing part is a miss.
 */
export class RedisBackend implements StoreBackend {
  readonly location: string;
  readonly client: Redis | Cluster;
  private readonly prefix: string;

  constructor(readonly options: RedisBackendOptions) {
    check(options.nodes.length > 0, 'config', 'redis store: no host given');
    this.prefix = options.keyPrefix ?? 'kvpack';
    check(/^[A-Za-z0-9_.-]{1,64}$/.test(this.prefix), 'config', `redis store: key prefix "${this.prefix}" must be 1–64 letters, digits, "_", "." or "-"`);
    const timeout = options.commandTimeoutMs ?? 2000;
    const common: RedisOptions = {
      commandTimeout: timeout,
      connectTimeout: timeout,
      maxRetriesPerRequest: 1,
      // Once connected, a command fails at once while the connection is down (a miss for a lookup)
      // instead of waiting in a queue: see ready().
      enableOfflineQueue: false,
      ...(options.username ? { username: options.username } : {}),
      ...(options.password ? { password: options.password } : {}),
      ...(options.tls ? { tls: {} } : {}),
      retryStrategy: (times) => Math.min(50 * times, 500),
    };
    this.location = `${options.tls ? 'rediss' : 'redis'}://${options.nodes.map((n) => `${n.host}:${n.port}`).join(',')}${options.cluster ? ' (cluster)' : ''}`;
    if (options.cluster) {
      const copts: ClusterOptions = {
        redisOptions: common,
        enableAutoPipelining: true,
        enableOfflineQueue: false,
        maxRedirections: 4,
        retryDelayOnFailover: 50,
        retryDelayOnClusterDown: 50,
        retryDelayOnTryAgain: 50,
        clusterRetryStrategy: (times) => Math.min(100 * times, 1000),
        slotsRefreshTimeout: timeout,
      };
      this.client = new Cluster(options.nodes, copts);
    } else {
      this.client = new Redis({ ...common, host: options.nodes[0].host, port: options.nodes[0].port, db: options.db ?? 0, enableAutoPipelining: true });
    }
    // Connection errors surface through the commands that fail; an unhandled 'error' event would end the process.
    this.client.on('error', () => {});
    this.timeoutMs = timeout;
  }

  private readonly timeoutMs: number;
  private firstReady: Promise<void> | undefined;

  /**
   * Waits (up to the command timeout) for the first connection; afterwards commands go straight to
   * the client, which fails them at once while disconnected (no offline queue), so that a server or
   * node that is down costs a lookup no more than a refused connection.
   */
  private ready(): Promise<void> {
    if (this.client.status === 'ready') return Promise.resolve();
    this.firstReady ??= new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.firstReady = undefined;
        this.client.off('ready', onReady);
        reject(new KvpackError('io', `redis store: no connection to ${this.location} within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      const onReady = () => {
        clearTimeout(timer);
        resolve();
      };
      this.client.once('ready', onReady);
    });
    return this.firstReady;
  }

  private key(ns: string, key: string, part: StorePart): string {
    if (!NAMESPACE_PATTERN.test(ns)) throw new KvpackError('config', `prefix store: "${ns}" is not a namespace id (32 hex digits)`);
    if (!KEY_PATTERN.test(key)) throw new KvpackError('config', `prefix store: "${key}" is not a prefix key (64 hex digits)`);
    return `${this.prefix}:${ns}:{${key}}:${SUFFIX[part]}`;
  }

  async get(ns: string, key: string, part: StorePart): Promise<Uint8Array | null> {
    await this.ready();
    const b = await this.client.getBuffer(this.key(ns, key, part));
    return b ? new Uint8Array(b.buffer, b.byteOffset, b.byteLength) : null;
  }


  async put(ns: string, key: string, part: StorePart, bytes: Uint8Array, options: PutObjectOptions = {}): Promise<void> {
    await this.ready();
    const k = this.key(ns, key, part);
    const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (options.ttlSeconds !== undefined) await this.client.set(k, buf, 'EX', Math.max(1, Math.ceil(options.ttlSeconds)));
    else await this.client.set(k, buf);
  }

  async remove(ns: string, key: string): Promise<boolean> {
    await this.ready();
    // One slot (hash tag), so one DEL, manifest first.
    const n = await this.client.del(this.key(ns, key, 'manifest'), this.key(ns, key, 'record'));
    return n > 0;
  }

  private nsKey(ns: string): string {
    if (!NAMESPACE_PATTERN.test(ns)) throw new KvpackError('config', `prefix store: "${ns}" is not a namespace id (32 hex digits)`);
    return `${this.prefix}:${ns}:ns`;
  }

  async getNamespace(ns: string): Promise<Uint8Array | null> {
    if (!NAMESPACE_PATTERN.test(ns)) return null;
    await this.ready();
    const b = await this.client.getBuffer(this.nsKey(ns));
    return b ? new Uint8Array(b.buffer, b.byteOffset, b.byteLength) : null;
  }

  async putNamespace(ns: string, descriptor: Uint8Array): Promise<void> {
    await this.ready();
    await this.client.set(this.nsKey(ns), Buffer.from(descriptor));
  }

  async removeNamespace(ns: string): Promise<void> {
    await this.ready();
    await this.client.del(this.nsKey(ns));
  }

  /** Every key matching `pattern` on every master (SCAN, never KEYS). */
  private async scan(pattern: string): Promise<string[]> {
    await this.ready();
    const nodes = this.client instanceof Cluster ? this.client.nodes('master') : [this.client];
    const out: string[] = [];
    for (const node of nodes) {
      let cursor = '0';
      do {
        const [next, keys] = await node.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
        out.push(...keys);
        cursor = next;
      } while (cursor !== '0');
    }
    return out;
  }

  async namespaces(): Promise<string[]> {
    const set = new Set<string>();
    const re = new RegExp(`^${this.prefix.replace(/\./g, '\\.')}:([0-9a-f]{32}):`);
    for (const k of await this.scan(`${this.prefix}:*`)) {
      const m = re.exec(k);
      if (m) set.add(m[1]);
    }
    return [...set].sort();
  }

  async *entries(ns: string): AsyncIterable<StoreEntry> {
    if (!NAMESPACE_PATTERN.test(ns)) return;
    const byKey = new Map<string, StoreEntry>();
    const re = /\{([0-9a-f]{64})\}:([rm])$/;
    for (const k of await this.scan(`${this.prefix}:${ns}:{*`)) {
      const m = re.exec(k);
      if (!m) continue;
      const e = byKey.get(m[1]) ?? { key: m[1], parts: [] };
      byKey.set(m[1], e);
      e.parts.push(m[2] === 'r' ? 'record' : 'manifest');
    }
    const list = [...byKey.values()].sort((a, b) => (a.key < b.key ? -1 : 1));
    const sizes = await Promise.all(list.map((e) => (e.parts.includes('record') ? this.client.strlen(this.key(ns, e.key, 'record')) : Promise.resolve(0))));
    list.forEach((e, i) => {
      if (e.parts.includes('record')) e.recordBytes = sizes[i];
    });
    yield* list;
  }

  async close(): Promise<void> {
    try {
      await this.client.quit();
    } catch {
      this.client.disconnect();
    }
  }
}
