// Property tests over the llama2.c loaders' headers: bit flips and byte edits in the header region,
// truncations at any length and random header fields end in a loaded model or a KvpackError, never
// another error type, an abort or a leaked tensor. Seeded and bounded (a few seconds per property).
import { readFileSync } from 'node:fs';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, selectBackend } from '@kvpack/core';
import { LLAMA2C_HEADER_BYTES, parseLlama2cCheckpoint } from './checkpoint.js';
import { parseLlama2cTokenizer } from './tokenizer.js';
import { HAVE_STORIES, SKIP_STORIES, STORIES_BIN, STORIES_TOK, randomModel, writeLlama2c, type RandomSpec } from '../model/reference.testutil.js';
import { FuzzTally, growingBits, releaseWeights } from '../fuzz.testutil.js';

beforeAll(async () => {
  await selectBackend('wasm');
});

const SPEC: RandomSpec = { dim: 16, hidden: 24, nLayers: 2, nHeads: 4, nKvHeads: 2, vocab: 40, maxSeqLen: 12, shared: false, groupSize: 8, seed: 5 };
const { ref, tables } = randomModel(SPEC);
/** Small test-written checkpoints of each version (v1/v2: 256-byte header; v0: 28 bytes). */
const FILES = ([0, 1, 2] as const).map((v) => ({ version: v, bytes: writeLlama2c(ref, tables, v, SPEC.groupSize) }));
const headerBytes = (v: number) => (v === 0 ? 28 : LLAMA2C_HEADER_BYTES);
/** Byte offset of n_layers: int32 #2 of the 7 (v0 at 0, v1/v2 after magic and version). */
const nLayersAt = (v: number) => (v === 0 ? 8 : 16);

const tallies: FuzzTally[] = [];
afterAll(() => {
  for (const t of tallies) console.log(t.line());
});

/** Applies one mutation to a copy of `bytes`. */
type Edit = { kind: 'flip'; at: number; bit: number } | { kind: 'set'; at: number; value: number } | { kind: 'cut'; length: number } | { kind: 'int'; field: number; value: number };
function apply(bytes: Uint8Array, e: Edit, version: number): Uint8Array {
  if (e.kind === 'cut') return bytes.slice(0, e.length);
  const b = Uint8Array.from(bytes);
  if (e.kind === 'flip') b[e.at] ^= 1 << e.bit;
  else if (e.kind === 'set') b[e.at] = e.value;
  else new DataView(b.buffer).setInt32((version === 0 ? 0 : 8) + 4 * e.field, e.value, true);
  return b;
}
function edits(headerLen: number, fileLen: number): fc.Arbitrary<Edit> {
  return fc.oneof(
    fc.record({ kind: fc.constant('flip' as const), at: fc.nat(headerLen - 1), bit: fc.nat(7) }),
    fc.record({ kind: fc.constant('set' as const), at: fc.nat(headerLen - 1), value: fc.nat(255) }),
    fc.record({ kind: fc.constant('cut' as const), length: fc.nat(fileLen) }),
    fc.record({
      kind: fc.constant('int' as const),
      field: fc.nat(6),
      value: fc.oneof(fc.integer({ min: -4, max: 64 }), fc.integer(), fc.constantFrom(0x7fffffff, -0x80000000, 1 << 30, 1e9)),
    }),
  );
}

/** Runs a tally's trial and fails the property on anything but a result or a KvpackError, or a leak. */
async function mustBeNamed(t: FuzzTally, run: () => unknown, release: (r: never) => void = () => {}, hostile = false): Promise<unknown> {
  const leaksBefore = t.leaks;
  const err = await t.trial(run as () => never, release, { hostile });
  if (err !== null && !(err instanceof KvpackError)) throw new Error(`not a KvpackError: ${(err as Error)?.stack ?? String(err)}`);
  if (t.leaks !== leaksBefore) throw new Error('leaked tfjs tensors');
  return err;
}

describe('llama2.c checkpoint header fuzzing (test-written v0/v1/v2 files)', () => {
  const tally = new FuzzTally('llama2.c checkpoint (v0/v1/v2 test files)');
  tallies.push(tally);

  it('bit flips, byte edits, truncations and random header fields give a model or a KvpackError, no leak', async () => {
    for (const f of FILES) {
      await fc.assert(
        fc.asyncProperty(edits(headerBytes(f.version) + 8, f.bytes.length), async (e) => {
          await mustBeNamed(tally, () => parseLlama2cCheckpoint(apply(f.bytes, e, f.version), `fuzz_v${f.version}.bin`), releaseWeights as never);
        }),
        { seed: 0x11a + f.version, numRuns: 150 },
      );
    }
    expect(tally.trials).toBe(450);
    expect(tally.other).toBe(0);
    expect(tally.leaks).toBe(0);
    expect(tally.named).toBeGreaterThan(100); // most header edits are caught, not silently loaded
    expect(tally.loaded).toBeGreaterThan(0); // edits in v1/v2 padding load fine
  });

  it('each bit of n_layers that makes it larger gives a named error within one second, before allocating', async () => {
    for (const f of FILES) {
      const at = nLayersAt(f.version);
      const bits = growingBits(SPEC.nLayers, 31);
      expect(bits).toHaveLength(30);
      for (const bit of [...bits, 31]) {
        const b = Uint8Array.from(f.bytes);
        new DataView(b.buffer).setInt32(at, SPEC.nLayers ^ (2 ** bit | 0), true);
        const t0 = performance.now();
        const err = await mustBeNamed(tally, () => parseLlama2cCheckpoint(b, `nlayers_v${f.version}.bin`), releaseWeights as never, true);
        const ms = performance.now() - t0;
        expect(err, `v${f.version} n_layers bit ${bit}`).toBeInstanceOf(KvpackError);
        expect(ms).toBeLessThan(1000);
        const m = (err as KvpackError).message;
        expect(m).toContain(`nlayers_v${f.version}.bin`);
        if (bit < 31) {
          expect((err as KvpackError).code).toBe('truncated');
          expect(m).toContain(`header n_layers = ${SPEC.nLayers ^ 2 ** bit} needs at least`);
        } else expect(m).toContain('n_layers = ');
      }
    }
  });
});

describe.skipIf(!HAVE_STORIES)(`llama2.c checkpoint header fuzzing, real stories260K Q8_0${SKIP_STORIES}`, () => {
  const tally = new FuzzTally('llama2.c checkpoint (stories260K_q80.bin)');
  tallies.push(tally);
  const bytes = HAVE_STORIES ? new Uint8Array(readFileSync(STORIES_BIN)) : new Uint8Array(0);

  it('header edits and truncations of the real file give a model or a KvpackError, no leak', async () => {
    await fc.assert(
      fc.asyncProperty(edits(LLAMA2C_HEADER_BYTES, bytes.length), async (e) => {
        await mustBeNamed(tally, () => parseLlama2cCheckpoint(apply(bytes, e, 2), 'stories260K_q80.bin'), releaseWeights as never);
      }),
      { seed: 0x260, numRuns: 120 },
    );
    expect(tally.other).toBe(0);
    expect(tally.leaks).toBe(0);
  });

  it('n_layers bit flips (each growing bit, 0..30) give a named error naming file and field within one second', async () => {
    const bits = growingBits(5, 31);
    expect(bits).toEqual([1, ...Array.from({ length: 29 }, (_, i) => i + 2).filter((b) => b !== 2)]);
    for (const bit of bits) {
      const b = Uint8Array.from(bytes);
      b[16 + (bit >> 3)] ^= 1 << (bit & 7);
      const t0 = performance.now();
      const err = await mustBeNamed(tally, () => parseLlama2cCheckpoint(b, 'stories260K_q80.bin'), releaseWeights as never, true);
      expect(performance.now() - t0).toBeLessThan(1000);
      expect(err).toBeInstanceOf(KvpackError);
      expect((err as KvpackError).code).toBe('truncated');
      expect((err as KvpackError).message).toMatch(
        new RegExp(`^stories260K_q80\\.bin: header n_layers = ${5 + 2 ** bit} needs at least \\d+ bytes .* but the file has 294816 bytes \\(295 KB\\)`),
      );
    }
    expect(tally.other).toBe(0);
    expect(tally.leaks).toBe(0);
  });
});

/** llama2.c tokenizer file: int32 max_token_length, per piece float32 score, int32 length, bytes. */
function tokFile(pieces: string[]): Uint8Array {
  const enc = pieces.map((p) => Buffer.from(p, 'utf8'));
  const parts: Buffer[] = [Buffer.alloc(4)];
  parts[0].writeInt32LE(Math.max(...enc.map((b) => b.length)), 0);
  enc.forEach((b, i) => {
    const h = Buffer.alloc(8);
    h.writeFloatLE(-i, 0);
    h.writeInt32LE(b.length, 4);
    parts.push(h, b);
  });
  return Buffer.concat(parts);
}

describe('llama2.c tokenizer fuzzing', () => {
  const tally = new FuzzTally('llama2.c tokenizer (test file + tok512.bin)');
  tallies.push(tally);
  const small = tokFile(['<unk>', '\n<s>\n', '\n</s>\n', ' ', 'a', 'b', 'ab', ' ab', 'hello']);
  const files = [{ name: 'tok_small.bin', bytes: small }, ...(HAVE_STORIES ? [{ name: 'tok512.bin', bytes: new Uint8Array(readFileSync(STORIES_TOK)) }] : [])];

  it('bit flips, byte edits, truncations and random lengths give a tokenizer or a KvpackError', async () => {
    for (const f of files) {
      const edit = fc.oneof(
        fc.record({ kind: fc.constant('flip' as const), at: fc.nat(Math.min(f.bytes.length, 200) - 1), bit: fc.nat(7) }),
        fc.record({ kind: fc.constant('cut' as const), length: fc.nat(f.bytes.length) }),
        // A random int32 in place of max_token_length (offset 0) or the first piece's length (offset 8).
        fc.record({ kind: fc.constant('len' as const), at: fc.constantFrom(0, 8), value: fc.oneof(fc.integer(), fc.integer({ min: -2, max: 40 })) }),
      );
      await fc.assert(
        fc.asyncProperty(edit, async (e) => {
          let b: Uint8Array;
          if (e.kind === 'cut') b = f.bytes.slice(0, e.length);
          else {
            b = Uint8Array.from(f.bytes);
            if (e.kind === 'flip') b[e.at] ^= 1 << e.bit;
            else new DataView(b.buffer).setInt32(e.at, e.value, true);
          }
          await mustBeNamed(tally, () => parseLlama2cTokenizer(b, f.name).encode('a b hello'));
        }),
        { seed: 0x70c, numRuns: 200 },
      );
    }
    // max_token_length flipped to a huge value: named, not an allocation.
    const b = Uint8Array.from(small);
    b[3] ^= 0x40;
    const err = await mustBeNamed(tally, () => parseLlama2cTokenizer(b, 'tok_small.bin'));
    expect((err as KvpackError).code).toBe('corrupt');
    expect((err as KvpackError).message).toMatch(/^tok_small\.bin: header max_token_length = 1073741830 needs a piece of at least 1073741842 bytes \(1\.07 GB\) with its headers but the file has 105 bytes$/);
    expect(tally.other).toBe(0);
    expect(tally.named).toBeGreaterThan(0);
  });
});
