import { fileURLToPath } from 'node:url';
import { KvpackError, check } from '@kvpack/core';
import type { StoreBackend } from './backend.js';
import { FileBackend } from './fs-backend.js';
import { RedisBackend } from './redis-backend.js';

/**
 * Opens the backend a store URL names:
 * - `file:///abs/path`, `file:rel/path` or a plain path: {@link FileBackend};
 * - `redis://[user:password@]host:port[/db][?prefix=kvpack&timeout=ms]`, `rediss://…` (TLS), and
 *   `valkey://…` / `valkeys://…` (the same protocol): {@link RedisBackend} on one server;
 * - `redis+cluster://host:port[,host:port…]` or `redis://host:port?cluster=1`: a Redis (or Valkey)
 *   Cluster, seeded from those nodes.
 * @throws KvpackError('config') for another scheme or a malformed address.
 */
export function openBackend(url: string): StoreBackend {
  check(typeof url === 'string' && url.length > 0, 'config', 'store URL is empty (file://PATH or redis://HOST:PORT)');
  const m = /^([a-z][a-z0-9+.-]*):/i.exec(url);
  const scheme = m?.[1].toLowerCase();
  if (!m || scheme === 'file' || /^[a-z]$/i.test(scheme ?? '')) {
    if (!m) return new FileBackend(url);
    if (url.startsWith('file://')) return new FileBackend(fileURLToPath(url));
    return new FileBackend(url.slice('file:'.length));
  }
  const cluster = scheme === 'redis+cluster' || scheme === 'valkey+cluster';
  const tls = scheme === 'rediss' || scheme === 'valkeys';
  if (!['redis', 'rediss', 'valkey', 'valkeys', 'redis+cluster', 'valkey+cluster'].includes(scheme!))
    throw new KvpackError('config', `store URL scheme "${scheme}:" is not supported: use file://PATH, redis://HOST:PORT, rediss://, valkey:// or redis+cluster://HOST:PORT,…`);
  const rest = url.slice(m[0].length).replace(/^\/\//, '');
  const [beforeQuery, query = ''] = rest.split('?', 2);
  const params = new URLSearchParams(query);
  const at = beforeQuery.lastIndexOf('@');
  const auth = at >= 0 ? beforeQuery.slice(0, at) : '';
  const hostPath = at >= 0 ? beforeQuery.slice(at + 1) : beforeQuery;
  const slash = hostPath.indexOf('/');
  const hosts = slash >= 0 ? hostPath.slice(0, slash) : hostPath;
  const path = slash >= 0 ? hostPath.slice(slash + 1) : '';
  const nodes = hosts.split(',').filter(Boolean).map((h) => {
    const hm = /^(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(h);
    if (!hm) throw new KvpackError('config', `store URL ${redact(url)}: "${h}" is not host:port`);
    const port = hm[2] ? Number(hm[2]) : 6379;
    check(port > 0 && port < 65536, 'config', `store URL ${redact(url)}: port ${hm[2]} is not in 1–65535`);
    return { host: hm[1].replace(/^\[|\]$/g, ''), port };
  });
  if (nodes.length === 0) nodes.push({ host: '127.0.0.1', port: 6379 });
  const db = path ? Number(path) : undefined;
  check(db === undefined || (Number.isInteger(db) && db >= 0), 'config', `store URL ${redact(url)}: database "${path}" is not a number`);
  const [user, pass] = auth ? auth.split(':', 2).map(decodeURIComponent) : [];
  const timeout = params.get('timeout');
  return new RedisBackend({
    nodes,
    cluster: cluster || params.get('cluster') === '1' || params.get('cluster') === 'true',
    tls,
    ...(db !== undefined ? { db } : {}),
    ...(pass !== undefined ? { username: user || undefined, password: pass } : user ? { password: user } : {}),
    ...(params.get('prefix') ? { keyPrefix: params.get('prefix')! } : {}),
    ...(timeout ? { commandTimeoutMs: Number(timeout) } : {}),
  });
}

/** A store URL with any password replaced by `***`, for messages. */
export function redact(url: string): string {
  return url.replace(/\/\/([^@/]*)@/, (_s, auth: string) => `//${auth.includes(':') ? auth.split(':')[0] + ':***' : '***'}@`);
}
