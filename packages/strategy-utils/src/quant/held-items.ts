import type { StoredDType, StoredItem, StoredTensor } from '@kvpack/core';
import type { CodesTensor } from './codes-tensor.js';

/**
 * A host-array {@link StoredItem} whose data is read only when a serialization writes it: byte
 * counting and `storedLayout()` see its name, dtype and shape and read nothing back from the backend.
 * `read` runs once per serialization (a synchronous readback of what the cache holds; a cache that
 * declares such items reads its tensors asynchronously first in `serializeAsync`).
 */
export function lazyHostItem(name: string, dtype: StoredDType, shape: number[], read: () => StoredTensor['data']): StoredItem {
  return {
    name,
    dtype,
    shape,
    get data() {
      return read();
    },
  };
}

/** Packed codes held on the backend as the uint8 item of their ⌈n·b/8⌉ bytes (read back when written). */
export function codesItem(name: string, codes: CodesTensor): StoredItem {
  return lazyHostItem(name, 'uint8', [codes.byteLength], () => codes.bytesSync(`tensor "${name}"`));
}
