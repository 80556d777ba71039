import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, readdir, rename, rm, stat, unlink } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { KvpackError } from '@kvpack/core';
import type { PutObjectOptions, StoreBackend, StoreEntry, StorePart } from './backend.js';
import { KEY_PATTERN, NAMESPACE_PATTERN } from './keys.js';

const EXT: Record<StorePart, string> = { record: '.kvr', manifest: '.json' };
const TMP = '.tmp-';

/** Options of {@link FileBackend}. */
export interface FileBackendOptions {
  /** fsync each object before its rename, so that a power loss leaves the old object or the new one (default true). */
  durable?: boolean;
}

/**
 * The filesystem backend, the embedded default. Layout: `ROOT/<namespace>/namespace.json` and
 * `ROOT/<namespace>/<key[0..1]>/<key>.kvr` (record) and `.json` (manifest). Every object is written
 * to a temporary file in its folder, fsynced, then renamed over its name (rename is atomic on POSIX
 * filesystems): a reader, or a process killed mid-write, sees the old object, the new one, or none,
 * never a part. The manifest is written after its record. TTLs are kept in the manifest (`expires`),
 * and `kvpack store gc` removes expired prefixes.
 */
export class FileBackend implements StoreBackend {
  readonly root: string;
  readonly location: string;
  private readonly durable: boolean;

  constructor(root: string, options: FileBackendOptions = {}) {
    this.root = resolve(root);
    this.location = `file://${this.root}`;
    this.durable = options.durable ?? true;
  }

  private dir(ns: string, key: string): string {
    if (!NAMESPACE_PATTERN.test(ns)) throw new KvpackError('config', `prefix store: "${ns}" is not a namespace id (32 hex digits)`);
    if (!KEY_PATTERN.test(key)) throw new KvpackError('config', `prefix store: "${key}" is not a prefix key (64 hex digits)`);
    return join(this.root, ns, key.slice(0, 2));
  }

  private path(ns: string, key: string, part: StorePart): string {
    return join(this.dir(ns, key), key + EXT[part]);
  }

  async get(ns: string, key: string, part: StorePart): Promise<Uint8Array | null> {
    return readOrNull(this.path(ns, key, part));
  }


  async put(ns: string, key: string, part: StorePart, bytes: Uint8Array, _options?: PutObjectOptions): Promise<void> {
    const dir = this.dir(ns, key);
    await mkdir(dir, { recursive: true });
    await this.atomicWrite(join(dir, key + EXT[part]), bytes);
  }

  private async atomicWrite(file: string, bytes: Uint8Array): Promise<void> {
    const tmp = `${file}${TMP}${process.pid}-${randomBytes(6).toString('hex')}`;
    const fh = await open(tmp, 'wx');
    try {
      await fh.writeFile(bytes);
      if (this.durable) await fh.sync();
    } catch (e) {
      await fh.close();
      await unlink(tmp).catch(() => {});
      throw e;
    }
    await fh.close();
    try {
      await rename(tmp, file);
    } catch (e) {
      await unlink(tmp).catch(() => {});
      throw e;
    }
  }

  async remove(ns: string, key: string): Promise<boolean> {
    let any = false;
    for (const part of ['manifest', 'record'] as const) {
      try {
        await unlink(this.path(ns, key, part));
        any = true;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      }
    }
    return any;
  }

  async getNamespace(ns: string): Promise<Uint8Array | null> {
    if (!NAMESPACE_PATTERN.test(ns)) return null;
    return readOrNull(join(this.root, ns, 'namespace.json'));
  }

  async putNamespace(ns: string, descriptor: Uint8Array): Promise<void> {
    await mkdir(join(this.root, ns), { recursive: true });
    await this.atomicWrite(join(this.root, ns, 'namespace.json'), descriptor);
  }

  async removeNamespace(ns: string): Promise<void> {
    if (!NAMESPACE_PATTERN.test(ns)) return;
    await rm(join(this.root, ns), { recursive: true, force: true });
  }

  async namespaces(): Promise<string[]> {
    return (await readdirOrEmpty(this.root)).filter((d) => NAMESPACE_PATTERN.test(d)).sort();
  }

  async *entries(ns: string): AsyncIterable<StoreEntry> {
    if (!NAMESPACE_PATTERN.test(ns)) return;
    for (const sub of (await readdirOrEmpty(join(this.root, ns))).filter((d) => /^[0-9a-f]{2}$/.test(d)).sort()) {
      const byKey = new Map<string, StoreEntry>();
      for (const f of await readdirOrEmpty(join(this.root, ns, sub))) {
        const m = /^([0-9a-f]{64})(\.kvr|\.json)$/.exec(f);
        if (!m) continue;
        const e = byKey.get(m[1]) ?? { key: m[1], parts: [] };
        byKey.set(m[1], e);
        if (m[2] === '.kvr') {
          e.parts.push('record');
          const s = await stat(join(this.root, ns, sub, f)).catch(() => null);
          if (s) {
            e.recordBytes = s.size;
            e.modified = s.mtimeMs;
          }
        } else e.parts.push('manifest');
      }
      yield* [...byKey.values()].sort((a, b) => (a.key < b.key ? -1 : 1));
    }
  }

  async sweepTemporary(olderThanMs: number): Promise<number> {
    let n = 0;
    const now = Date.now();
    for (const ns of await this.namespaces()) {
      const dirs = [join(this.root, ns), ...(await readdirOrEmpty(join(this.root, ns))).filter((d) => /^[0-9a-f]{2}$/.test(d)).map((d) => join(this.root, ns, d))];
      for (const d of dirs)
        for (const f of await readdirOrEmpty(d)) {
          if (!f.includes(TMP)) continue;
          const s = await stat(join(d, f)).catch(() => null);
          if (s && now - s.mtimeMs >= olderThanMs) {
            await unlink(join(d, f)).catch(() => {});
            n++;
          }
        }
    }
    return n;
  }

  async close(): Promise<void> {}
}

async function readOrNull(file: string): Promise<Uint8Array | null> {
  try {
    const b = await readFile(file);
    return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return null;
    throw e;
  }
}

async function readdirOrEmpty(dir: string): Promise<string[]> {
  try {
    return await readdir(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
}
