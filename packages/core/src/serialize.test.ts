import * as tf from '@tensorflow/tfjs-core';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  KvpackError,
  createStrategy,
  decodeContainer,
  deserializeCache,
  encodeContainer,
  headerBytes,
  selectBackend,
  type CompressedCache,
} from './index.js';
import { cacheSnapshot } from './restore-fuzz.js';
import { splitContainer, writeContainer } from './serialize.js';
import { disposeKVCache, syntheticCache } from './conformance.js';

beforeAll(async () => {
  await selectBackend('wasm');
});

/** The error a call throws (or a failure when it does not throw). */
function thrown(f: () => unknown): KvpackError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(KvpackError);
    return e as KvpackError;
  }
  throw new Error('expected a KvpackError, nothing was thrown');
}

/** A serialized dense cache with 3 decode tokens on layer 2, its snapshot, and the tensor count before. */
async function saved(): Promise<{ bytes: Uint8Array; snap: Float32Array[] }> {
  const kv = syntheticCache(16, { nLayers: 3 });
  const c = await createStrategy({ name: 'dense', options: {} }).compress({ ...kv, model: 'sha256:abc' });
  const k = tf.randomNormal([3, 2, 16], 0, 1, 'float32', 3) as tf.Tensor3D;
  c.append(2, k, k);
  k.dispose();
  const bytes = c.serialize();
  const snap = await cacheSnapshot(c);
  c.dispose();
  disposeKVCache(kv);
  return { bytes, snap };
}

/** The container rewritten with an edited header (and a valid checksum): what a buggy or hostile writer produces. */
function rewritten(bytes: Uint8Array, edit: (h: Record<string, any>) => void): Uint8Array {
  const { header, payload } = splitContainer(bytes);
  const h = JSON.parse(header);
  edit(h);
  return writeContainer(JSON.stringify(h), payload);
}

describe('container format', () => {
  it('reads a Node Buffer whose bytes sit at an odd offset of a larger ArrayBuffer (as pooled Buffers do)', async () => {
    const { bytes, snap } = await saved();
    const pool = Buffer.alloc(bytes.length + 64, 0x41);
    pool.set(bytes, 37);
    const view = pool.subarray(37, 37 + bytes.length);
    expect(view.byteOffset).toBe(37);
    const r = deserializeCache(view);
    const got = await cacheSnapshot(r);
    got.forEach((x, i) => expect(Buffer.from(x.buffer).equals(Buffer.from(snap[i].buffer))).toBe(true));
    r.dispose();
  });

  it('checksums the header: a changed RoPE theta, tensor offset, residual name or layer count is refused', async () => {
    const { bytes } = await saved();
    const { header } = splitContainer(bytes);
    const edits: [string, string][] = [
      ['"theta":10000', '"theta":90000'],
      ['"offset":0', '"offset":8'],
      ['"residual.k.2"', '"residual.q.2"'],
      ['"nLayers":3', '"nLayers":2'],
    ];
    for (const [from, to] of edits) {
      expect(header).toContain(from);
      const at = header.indexOf(from);
      const out = bytes.slice();
      out.set(new TextEncoder().encode(to), 24 + at);
      const start = tf.memory().numTensors;
      expect(thrown(() => deserializeCache(out)).message, `${from} → ${to}`).toMatch(/CRC-32 mismatch/);
      expect(tf.memory().numTensors).toBe(start);
    }
  });

  it('names each structural field that a re-checksummed header gets wrong, leaking nothing', async () => {
    const { bytes } = await saved();
    const cases: [string, (h: Record<string, any>) => void, RegExp][] = [
      ['overlapping tensors', (h) => (h.tensors[1].offset -= 2), /tensor "v\.0" starts at payload byte \d+, expected \d+/],
      ['a tensor past the payload', (h) => (h.tensors.at(-1).bytes += 4), /ends at byte \d+, past the \d+-byte payload|needs \d+/],
      ['a shape that does not match the bytes', (h) => (h.tensors[0].shape = [16, 2, 15]), /tensor "k\.0" has \d+ bytes, but shape \[16,2,15\] of float16 needs/],
      ['a renamed residual tensor', (h) => (h.tensors.find((t: any) => t.name === 'residual.k.2').name = 'residual.q.2'), /residual values without keys|residual\.q\.2/],
      ['a huge layer count', (h) => (h.meta.layout.nLayers = 1e9), /layout\.nLayers/],
      ['a layer count too large for the tensors', (h) => (h.meta.layout.nLayers = 40), /nLayers = 40, but the payload holds only \d+ tensors/],
      ['one layer fewer', (h) => (h.meta.layout.nLayers = 2), /tensors that a dense cache does not have: k\.2/],
      ['a missing layout', (h) => delete h.meta.layout, /metadata field layout/],
      ['a non-integer prefill length', (h) => (h.meta.prefillLength = 1.5), /metadata field prefillLength/],
      ['a shape against the layout', (h) => { h.meta.layout.headDim = 8; h.tensors[0].shape = [16, 2, 8]; }, /has \d+ bytes, but shape|expected \[16,2,8\]/],
      ['a duplicate name', (h) => (h.tensors[1].name = 'k.0'), /tensor "k\.0" appears twice/],
      ['an unknown dtype', (h) => (h.tensors[0].dtype = 'float8'), /header field tensors\.0\.dtype/],
      ['a negative start position', (h) => (h.meta.startPosition = -4), /metadata field startPosition/],
      ['options the strategy rejects', (h) => (h.options.storage = 'int3'), /records invalid options for strategy "dense"/],
      ['an unknown strategy', (h) => (h.strategy = 'nope'), /unknown strategy "nope"/],
    ];
    for (const [what, edit, message] of cases) {
      const start = tf.memory().numTensors;
      const e = thrown(() => deserializeCache(rewritten(bytes, edit)));
      expect(e.message, what).toMatch(message);
      expect(e.code === 'corrupt' || e.code === 'unknown-strategy', what).toBe(true);
      expect(tf.memory().numTensors, what).toBe(start);
    }
  });

  it('refuses version-1 files by version, and other versions by number', async () => {
    const { bytes } = await saved();
    for (const [version, message] of [
      [1, /container format version 1, which this build no longer reads/],
      [7, /unsupported container format version 7 \(this build reads version 2\)/],
    ] as const) {
      const out = bytes.slice();
      new DataView(out.buffer).setUint32(4, version, true);
      expect(thrown(() => decodeContainer(out)).message).toMatch(message);
    }
  });

  it('names truncation at every length', async () => {
    const { bytes } = await saved();
    for (const n of [0, 3, 8, 23, 24, headerBytes(bytes) - 1, headerBytes(bytes), bytes.length - 1]) {
      const e = thrown(() => deserializeCache(bytes.subarray(0, n)));
      expect(e.code, `length ${n}`).toBe('truncated');
    }
    const longer = new Uint8Array(bytes.length + 1);
    longer.set(bytes);
    expect(thrown(() => deserializeCache(longer)).message).toMatch(/1 trailing bytes/);
  });

  it('records the model fingerprint and refuses a cache made from another model', async () => {
    const { bytes } = await saved();
    expect(decodeContainer(bytes).model).toBe('sha256:abc');
    const ok: CompressedCache = deserializeCache(bytes, { model: 'sha256:abc' });
    expect(ok.model).toBe('sha256:abc');
    expect(Buffer.from(ok.serialize()).equals(Buffer.from(bytes))).toBe(true);
    ok.dispose();
    const e = thrown(() => deserializeCache(bytes, { model: 'sha256:def' }));
    expect(e.code).toBe('model');
    expect(e.message).toMatch(/made from model sha256:abc, not from model sha256:def/);
  });

  it('accepts every byte view, and refuses what is not bytes', () => {
    const c = encodeContainer({ strategy: 'x', options: {}, meta: {}, tensors: [{ name: 'a', dtype: 'int8', shape: [2], data: new Int8Array([1, -2]) }] });
    const shared = new SharedArrayBuffer(c.length);
    new Uint8Array(shared).set(c);
    expect(Array.from(decodeContainer(shared).get('a').data)).toEqual([1, -2]);
    expect(Array.from(decodeContainer(new DataView(c.buffer)).get('a').data)).toEqual([1, -2]);
    expect(thrown(() => decodeContainer('KVPK' as unknown as Uint8Array)).code).toBe('dtype');
  });
});
