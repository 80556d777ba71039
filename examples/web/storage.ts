/**
 * Where the page keeps a saved session: IndexedDB (one record: the session file's bytes and what the
 * page needs to show it again) or the origin private file system (two files).
 */
import { KvpackError } from '@kvpack/core';

export type StorageKind = 'indexeddb' | 'opfs';

/** What the page records beside the session file. */
export interface SavedMeta {
  /** The model's name on the page (the cache itself records the model's fingerprint). */
  model: string;
  promptIds: number[];
  /** Tokens generated so far (the last one is the session file's pending token). */
  generated: number[];
  /** The strategy text box. */
  strategy: string;
  savedAt: number;
}

const DB = 'kvpack';
const STORE = 'sessions';
const KEY = 'last';
const FILE = 'kvpack-session.kvps';
const META = 'kvpack-session.json';

function request<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

async function openDb(): Promise<IDBDatabase> {
  const open = indexedDB.open(DB, 1);
  open.onupgradeneeded = () => open.result.createObjectStore(STORE);
  return request(open);
}

async function opfsDir(): Promise<FileSystemDirectoryHandle> {
  if (!navigator.storage?.getDirectory) throw new KvpackError('unsupported', 'this browser has no origin private file system (OPFS); save in IndexedDB');
  return navigator.storage.getDirectory();
}

/** Saves the session file and its page record, replacing an earlier one. */
export async function saveSession(kind: StorageKind, file: Uint8Array, meta: SavedMeta): Promise<void> {
  try {
    if (kind === 'indexeddb') {
      const db = await openDb();
      try {
        const tx = db.transaction(STORE, 'readwrite');
        tx.objectStore(STORE).put({ file, meta }, KEY);
        await new Promise<void>((resolve, reject) => {
          tx.oncomplete = () => resolve();
          tx.onerror = () => reject(tx.error);
          tx.onabort = () => reject(tx.error ?? new Error('transaction aborted'));
        });
      } finally {
        db.close();
      }
      return;
    }
    const dir = await opfsDir();
    for (const [name, body] of [
      [FILE, file],
      [META, new TextEncoder().encode(JSON.stringify(meta))],
    ] as const) {
      const w = await (await dir.getFileHandle(name, { create: true })).createWritable();
      await w.write(body as Uint8Array<ArrayBuffer>);
      await w.close();
    }
  } catch (e) {
    if (e instanceof KvpackError) throw e;
    throw new KvpackError('io', `cannot save the session in ${kind === 'opfs' ? 'OPFS' : 'IndexedDB'}: ${(e as Error).message}`, { cause: e });
  }
}

/** The saved session file and its page record, or undefined when nothing is saved. */
export async function loadSaved(kind: StorageKind): Promise<{ file: Uint8Array; meta: SavedMeta } | undefined> {
  try {
    if (kind === 'indexeddb') {
      const db = await openDb();
      try {
        return (await request(db.transaction(STORE).objectStore(STORE).get(KEY))) as { file: Uint8Array; meta: SavedMeta } | undefined;
      } finally {
        db.close();
      }
    }
    const dir = await opfsDir();
    let fh: FileSystemFileHandle;
    let mh: FileSystemFileHandle;
    try {
      fh = await dir.getFileHandle(FILE);
      mh = await dir.getFileHandle(META);
    } catch {
      return undefined;
    }
    const file = new Uint8Array(await (await fh.getFile()).arrayBuffer());
    const meta = JSON.parse(await (await mh.getFile()).text()) as SavedMeta;
    return { file, meta };
  } catch (e) {
    if (e instanceof KvpackError) throw e;
    throw new KvpackError('io', `cannot read the saved session from ${kind === 'opfs' ? 'OPFS' : 'IndexedDB'}: ${(e as Error).message}`, { cause: e });
  }
}
