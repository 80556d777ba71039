/** The two objects of a stored prefix: its record (the serialized cache in a checksummed envelope) and its manifest. */
export type StorePart = 'record' | 'manifest';

/** Options of {@link StoreBackend.put}. */
export interface PutObjectOptions {
  /** Seconds until the backend may drop the object (Redis/Valkey `EX`); backends without expiry ignore it (the manifest's `expires` still makes the prefix a miss). */
  ttlSeconds?: number;
}

/** One stored key of a namespace, as a listing sees it. */
export interface StoreEntry {
  key: string;
  /** Which parts exist (a record without a manifest is an interrupted write or an evicted manifest; gc removes it). */
  parts: StorePart[];
  /** Bytes of the record, when the backend knows without reading it. */
  recordBytes?: number;
  /** Milliseconds since the epoch when the record was last written, when the backend knows. */
  modified?: number;
}

/**
 * Where a prefix store keeps its objects: an object store of small manifests and large records
 * addressed by (namespace, key, part). Each `put` must be atomic (a reader sees the whole object or
 * none); the store writes a record before its manifest and reads a manifest before its record, so
 * a backend needs no transactions. Objects may vanish at any time (TTL, maxmemory eviction, an
 * operator): a missing object is a miss, never an error.
 *
 * An S3-compatible object store plugs in with one object per part — `PUT <prefix>/<namespace>/<key>.record`
 * and `.manifest` (a single PUT is atomic in S3), `GET` answering 404 as null, `DeleteObjects` for
 * {@link remove}, `ListObjectsV2` under `<prefix>/<namespace>/` for {@link entries} and under
 * `<prefix>/` with delimiter `/` for {@link namespaces}, and a bucket lifecycle rule (or the manifest's
 * `expires`) for TTLs. See the package README.
 */
export interface StoreBackend {
  /** Where the objects live, for messages (no credentials). */
  readonly location: string;
  /** One object, or null when absent. */
  get(namespace: string, key: string, part: StorePart): Promise<Uint8Array | null>;
  /** Writes one object atomically, replacing any previous one. */
  put(namespace: string, key: string, part: StorePart, bytes: Uint8Array, options?: PutObjectOptions): Promise<void>;
  /** Removes both parts of a key (the manifest first). @returns whether anything was removed */
  remove(namespace: string, key: string): Promise<boolean>;
  /** The namespace's descriptor (JSON), or null. */
  getNamespace(namespace: string): Promise<Uint8Array | null>;
  /** Writes the namespace's descriptor (JSON). */
  putNamespace(namespace: string, descriptor: Uint8Array): Promise<void>;
  /** Removes a namespace's descriptor (after its keys are gone). */
  removeNamespace(namespace: string): Promise<void>;
  /** Namespace ids that hold a descriptor or any object. */
  namespaces(): Promise<string[]>;
  /** Every key of a namespace with the parts present. */
  entries(namespace: string): AsyncIterable<StoreEntry>;
  /** Removes leftovers of interrupted writes (temporary files) older than `olderThanMs`. @returns how many */
  sweepTemporary?(olderThanMs: number): Promise<number>;
  /** Closes connections. */
  close(): Promise<void>;
}
