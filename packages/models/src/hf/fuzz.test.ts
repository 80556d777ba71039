// Property tests over the Hugging Face loaders: safetensors headers (bit flips and byte edits in the
// header region, truncations, random integer fields), the sharded index, config.json fields and
// tokenizer.json ids. Each trial ends in a result or a KvpackError, never another error type, and
// leaves no tfjs tensor behind. Seeded and bounded (a few seconds per property).
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { KvpackError, selectBackend } from '@kvpack/core';
import { parseHfConfig, unknownHfConfigKeys } from './config.js';
import { loadHfModel, loadHfWeights } from './load.js';
import { HfTokenizer, findDuplicateVocabPiece } from './tokenizer.js';
import { MODELS_DIR, tinyCheckpoint, writeHfDir, type TinySpec } from './testutil.js';
import { FuzzTally, growingBits, releaseWeights } from '../fuzz.testutil.js';

const SPEC: TinySpec = { dim: 16, hiddenDim: 24, nLayers: 2, nHeads: 4, nKvHeads: 2, vocabSize: 20 };
const CK = tinyCheckpoint(SPEC, 9);
const RULER = join(MODELS_DIR, 'rulermini-19m');
const HAVE_RULER = existsSync(join(RULER, 'config.json')) && existsSync(join(RULER, 'model.safetensors.index.json'));
const SKIP_RULER = HAVE_RULER ? '' : ` (SKIPPED: ${RULER} not found; set KVPACK_MODELS_DIR)`;

let tmp: string;
const tallies: FuzzTally[] = [];
beforeAll(async () => {
  await selectBackend('wasm');
  tmp = mkdtempSync(join(tmpdir(), 'kvpack-hf-fuzz-'));
});
afterAll(() => {
  for (const t of tallies) console.log(t.line());
  rmSync(tmp, { recursive: true, force: true });
});

/** A trial that fails the property on anything but a result or a KvpackError, or on a leak. */
async function mustBeNamed<T>(t: FuzzTally, run: () => Promise<T> | T, release?: (r: T) => void, hostile = false): Promise<unknown> {
  const leaks = t.leaks;
  const err = await t.trial(run, release, { hostile });
  if (err !== null && !(err instanceof KvpackError)) throw new Error(`not a KvpackError: ${(err as Error)?.stack ?? String(err)}`);
  if (t.leaks !== leaks) throw new Error('leaked tfjs tensors');
  return err;
}

const i64 = fc.oneof(
  fc.integer({ min: -3, max: 4096 }),
  fc.constantFrom(2 ** 31, 2 ** 32 + 8, 2 ** 53 - 1, 1e9, 1e300, -1, 0.5),
  fc.integer(),
);

describe('safetensors header fuzzing (single test-written file)', () => {
  const tally = new FuzzTally('HF safetensors header');
  tallies.push(tally);

  it('bit flips and byte edits in the header, truncations and random integer fields: weights or a KvpackError, no leak', async () => {
    const d = join(tmp, 'st');
    writeHfDir(d, CK);
    const file = join(d, 'model.safetensors');
    const good = new Uint8Array(readFileSync(file));
    const n = Number(new DataView(good.buffer).getBigUint64(0, true));
    const header = JSON.parse(new TextDecoder().decode(good.subarray(8, 8 + n))) as Record<string, { dtype: string; shape: number[]; data_offsets: number[] }>;
    const names = Object.keys(header).filter((k) => k !== '__metadata__');
    const edit = fc.oneof(
      fc.record({ kind: fc.constant('flip' as const), at: fc.nat(8 + n - 1), bit: fc.nat(7) }),
      fc.record({ kind: fc.constant('set' as const), at: fc.nat(8 + n - 1), value: fc.nat(255) }),
      fc.record({ kind: fc.constant('cut' as const), length: fc.nat(good.length) }),
      fc.record({
        kind: fc.constant('field' as const),
        tensor: fc.constantFrom(...names),
        field: fc.constantFrom('shape0', 'shape1', 'begin', 'end', 'dtype'),
        value: i64,
      }),
    );
    await fc.assert(
      fc.asyncProperty(edit, async (e) => {
        let b: Uint8Array;
        if (e.kind === 'cut') b = good.slice(0, e.length);
        else if (e.kind === 'field') {
          const h = structuredClone(header);
          const t = h[e.tensor];
          if (e.field === 'shape0') t.shape[0] = e.value;
          else if (e.field === 'shape1') t.shape[t.shape.length > 1 ? 1 : 0] = e.value;
          else if (e.field === 'begin') t.data_offsets[0] = e.value;
          else if (e.field === 'end') t.data_offsets[1] = e.value;
          else t.dtype = ['F16', 'BF16', 'I32', 'F64', 'X9'][Math.abs(e.value) % 5];
          let json = new TextEncoder().encode(JSON.stringify(h));
          const padded = new Uint8Array(Math.ceil(json.length / 8) * 8).fill(0x20);
          padded.set(json);
          json = padded;
          b = new Uint8Array(8 + json.length + good.length - 8 - n);
          new DataView(b.buffer).setBigUint64(0, BigInt(json.length), true);
          b.set(json, 8);
          b.set(good.subarray(8 + n), 8 + json.length);
        } else {
          b = Uint8Array.from(good);
          if (e.kind === 'flip') b[e.at] ^= 1 << e.bit;
          else b[e.at] = e.value;
        }
        writeFileSync(file, b);
        await mustBeNamed(tally, () => loadHfWeights(d), releaseWeights);
      }),
      { seed: 0x5afe, numRuns: 250 },
    );
    expect(tally.other).toBe(0);
    expect(tally.leaks).toBe(0);
    expect(tally.named).toBeGreaterThan(100);
    expect(tally.loaded).toBeGreaterThan(0); // e.g. flips in the header's padding
  });

  it('refuses overlapping data_offsets, naming both tensors', async () => {
    const d = join(tmp, 'overlap');
    writeHfDir(d, CK);
    const file = join(d, 'model.safetensors');
    const good = new Uint8Array(readFileSync(file));
    const n = Number(new DataView(good.buffer).getBigUint64(0, true));
    const h = JSON.parse(new TextDecoder().decode(good.subarray(8, 8 + n)));
    // Two tensors of the same byte length: point the second at the first's bytes.
    const a = h['model.layers.0.input_layernorm.weight'];
    const b = h['model.layers.0.post_attention_layernorm.weight'];
    b.data_offsets = [...a.data_offsets];
    const json = new TextEncoder().encode(JSON.stringify(h).padEnd(n, ' '));
    expect(json.length).toBe(n);
    const out = Uint8Array.from(good);
    out.set(json, 8);
    writeFileSync(file, out);
    const err = await mustBeNamed(tally, () => loadHfWeights(d), releaseWeights);
    expect(err).toBeInstanceOf(KvpackError);
    expect((err as KvpackError).code).toBe('corrupt');
    expect((err as KvpackError).message).toMatch(/model\.safetensors: tensors "model\.layers\.0\.(input|post_attention)_layernorm\.weight" .* overlap in data_offsets/);
  });
});

describe('sharded index fuzzing (model.safetensors.index.json)', () => {
  const tally = new FuzzTally('HF sharded index');
  tallies.push(tally);

  it('structural edits and byte flips of the index give weights or a KvpackError naming the index or shard', async () => {
    const d = join(tmp, 'shards');
    writeHfDir(d, CK, { shards: 3 });
    const idxFile = join(d, 'model.safetensors.index.json');
    const text = readFileSync(idxFile, 'utf8');
    const idx = JSON.parse(text) as { weight_map: Record<string, string> };
    const tensors = Object.keys(idx.weight_map);
    const shards = [...new Set(Object.values(idx.weight_map))];
    const edit = fc.oneof(
      fc.record({ kind: fc.constant('drop' as const), t: fc.constantFrom(...tensors) }),
      fc.record({ kind: fc.constant('move' as const), t: fc.constantFrom(...tensors), s: fc.constantFrom(...shards, 'model-00009-of-00003.safetensors', '../x.safetensors', '') }),
      fc.record({ kind: fc.constant('add' as const), t: fc.string({ maxLength: 12 }), s: fc.constantFrom(...shards) }),
      fc.record({ kind: fc.constant('flip' as const), at: fc.nat(text.length - 1), bit: fc.nat(6) }),
    );
    let checked = 0;
    await fc.assert(
      fc.asyncProperty(edit, async (e) => {
        let out: string;
        if (e.kind === 'flip') {
          const b = Buffer.from(text);
          b[e.at] ^= 1 << e.bit;
          out = b.toString('latin1');
        } else {
          const wm = { ...idx.weight_map };
          if (e.kind === 'drop') delete wm[e.t];
          else if (e.kind === 'move') wm[e.t] = e.s;
          else wm[e.t] = e.s;
          out = JSON.stringify({ metadata: {}, weight_map: wm });
        }
        writeFileSync(idxFile, out, 'latin1');
        const err = await mustBeNamed(tally, () => loadHfWeights(d), releaseWeights);
        // Dropping or moving a tensor must not load silently.
        if ((e.kind === 'drop' || (e.kind === 'move' && e.s !== idx.weight_map[e.t])) && tensors.includes(e.t)) {
          expect(err, `${e.kind} ${e.t}`).toBeInstanceOf(KvpackError);
          checked++;
        }
      }),
      { seed: 0x1dec, numRuns: 150 },
    );
    writeFileSync(idxFile, text);
    expect(checked).toBeGreaterThan(20);
    expect(tally.other).toBe(0);
    expect(tally.leaks).toBe(0);
  });

  it('names a tensor stored in two shards and one a shard holds but the index does not list', async () => {
    const d = join(tmp, 'dup');
    writeHfDir(d, CK, { shards: 2 });
    const idxFile = join(d, 'model.safetensors.index.json');
    const idx = JSON.parse(readFileSync(idxFile, 'utf8'));
    const victim = 'model.norm.weight';
    const home = idx.weight_map[victim];
    delete idx.weight_map[victim];
    writeFileSync(idxFile, JSON.stringify(idx));
    const err = await mustBeNamed(tally, () => loadHfWeights(d), releaseWeights);
    expect((err as KvpackError).code).toBe('corrupt');
    expect((err as KvpackError).message).toContain(`${home}: tensor "${victim}" is not listed in model.safetensors.index.json`);
  });
});

describe('config.json fuzzing and num_hidden_layers bit flips', () => {
  const tally = new FuzzTally('HF config.json');
  tallies.push(tally);
  const KEYS = ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'vocab_size', 'max_position_embeddings', 'head_dim', 'rms_norm_eps', 'rope_theta'];

  it('random values of the dimension fields give weights or a KvpackError, no leak', async () => {
    const d = join(tmp, 'cfg');
    writeHfDir(d, CK);
    const value = fc.oneof(i64, fc.double(), fc.constantFrom(null, '12', true, [2], {}));
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...KEYS), value, async (key, v) => {
        writeFileSync(join(d, 'config.json'), JSON.stringify({ ...CK.config, [key]: v }));
        await mustBeNamed(tally, () => loadHfWeights(d), releaseWeights);
      }),
      { seed: 0xc0f, numRuns: 200 },
    );
    expect(tally.other).toBe(0);
    expect(tally.leaks).toBe(0);
    expect(tally.named).toBeGreaterThan(100);
  });

  it('each growing bit of num_hidden_layers (0..52) gives a named error within one second; 1e9 too', async () => {
    const d = join(tmp, 'layers');
    writeHfDir(d, CK);
    const bits = growingBits(SPEC.nLayers, 53);
    expect(bits).toHaveLength(52);
    const values = [...bits.map((b) => SPEC.nLayers + 2 ** b), 1e9];
    for (const v of values) {
      writeFileSync(join(d, 'config.json'), JSON.stringify({ ...CK.config, num_hidden_layers: v }));
      const t0 = performance.now();
      const err = await mustBeNamed(tally, () => loadHfWeights(d), releaseWeights, true);
      expect(performance.now() - t0).toBeLessThan(1000);
      expect(err, `num_hidden_layers ${v}`).toBeInstanceOf(KvpackError);
      expect((err as KvpackError).code).toBe('config');
      const m = (err as KvpackError).message;
      expect(m).toContain(join(d, 'config.json'));
      if (v <= 2048) expect(m).toContain(`num_hidden_layers = ${v} but the safetensors in ${d} hold 2 layers (model.layers.0 … model.layers.1)`);
      else expect(m).toContain(`"num_hidden_layers" = ${v} is above the sane bound 2048`);
    }
  });

  it.skipIf(!HAVE_RULER)(`rulermini-19m: growing bits of num_hidden_layers give a named error within one second${SKIP_RULER}`, async () => {
    const d = join(tmp, 'ruler');
    mkdirSync(d);
    for (const f of ['model.safetensors.index.json', 'model-00001-of-00004.safetensors', 'model-00002-of-00004.safetensors', 'model-00003-of-00004.safetensors', 'model-00004-of-00004.safetensors'])
      symlinkSync(join(RULER, f), join(d, f));
    const cfg = JSON.parse(readFileSync(join(RULER, 'config.json'), 'utf8'));
    expect(cfg.num_hidden_layers).toBe(12);
    for (const bit of growingBits(12, 31)) {
      const v = 12 + 2 ** bit;
      writeFileSync(join(d, 'config.json'), JSON.stringify({ ...cfg, num_hidden_layers: v }));
      const t0 = performance.now();
      const err = await mustBeNamed(tally, () => loadHfWeights(d), releaseWeights, true);
      expect(performance.now() - t0).toBeLessThan(1000);
      expect((err as KvpackError).code).toBe('config');
      expect((err as KvpackError).message).toMatch(v <= 2048 ? /hold 12 layers/ : /above the sane bound/);
    }
  });

  it('warns about a misspelt key, naming it and the key it likely means; standard HF keys pass silently', () => {
    const warnings: string[][] = [];
    const cfg = { ...CK.config, num_hiden_layers: 7, rope_thetta: 1e6, transformers_version: '4.44.0', torch_dtype: 'bfloat16', pad_token_id: 0 };
    const c = parseHfConfig(cfg, 'my/config.json', { onWarning: (_m, keys) => warnings.push(keys.map((k) => `${k.key}→${k.suggestion}`)) });
    expect(c.nLayers).toBe(2);
    expect(warnings).toEqual([['num_hiden_layers→num_hidden_layers', 'rope_thetta→rope_theta']]);
    expect(unknownHfConfigKeys({ ...CK.config, architectures: ['LlamaForCausalLM'], bos_token_id: 1, use_cache: true, foo_bar_baz: 1 })).toEqual([{ key: 'foo_bar_baz' }]);
    // Default reporting: console.warn, once, with the file and each key.
    const spy = vi.spyOn(console, 'warn').mockImplementation(() => {});
    try {
      parseHfConfig({ ...CK.config, num_hiden_layers: 7 }, 'my/config.json');
      expect(spy).toHaveBeenCalledTimes(1);
      expect(spy.mock.calls[0][0]).toBe(
        'my/config.json: ignoring 1 key kvpack does not understand: "num_hiden_layers" (did you mean "num_hidden_layers"?); settings they were meant to give take their defaults',
      );
      spy.mockClear();
      parseHfConfig(CK.config, 'my/config.json');
      expect(spy).not.toHaveBeenCalled();
    } finally {
      spy.mockRestore();
    }
  });

  it.skipIf(!HAVE_RULER)(`rulermini-19m's config.json maps without a warning${SKIP_RULER}`, () => {
    const onWarning = vi.fn();
    parseHfConfig(JSON.parse(readFileSync(join(RULER, 'config.json'), 'utf8')), 'config.json', { onWarning });
    expect(onWarning).not.toHaveBeenCalled();
  });
});

describe('tokenizer.json ids', () => {
  const tally = new FuzzTally('HF tokenizer.json');
  tallies.push(tally);
  const words = ['<pad>', '<bos>', '<eos>', 'the', 'cat', 'sat', 'on', 'mat'];
  const tokJson = (vocab: Record<string, number>, added = [0, 1, 2].map((id) => ({ id, content: words[id] }))) => ({
    version: '1.0',
    added_tokens: added.map((a) => ({ ...a, special: true, single_word: false, lstrip: false, rstrip: false, normalized: false })),
    normalizer: null,
    pre_tokenizer: { type: 'WhitespaceSplit' },
    post_processor: null,
    decoder: null,
    model: { type: 'WordLevel', vocab, unk_token: '<pad>' },
  });
  const VOCAB = Object.fromEntries(words.map((w, i) => [w, i]));

  it('refuses a duplicate id in model.vocab and an added token colliding with a vocab id', () => {
    const e1 = (() => {
      try {
        new HfTokenizer(tokJson({ ...VOCAB, dog: 4 }), {}, { source: 'dup/tokenizer.json' });
      } catch (e) {
        return e;
      }
    })();
    expect(e1).toBeInstanceOf(KvpackError);
    expect((e1 as KvpackError).code).toBe('corrupt');
    expect((e1 as KvpackError).message).toBe('dup/tokenizer.json: duplicate id 4 in model.vocab: both "cat" and "dog" map to it, so decoding 4 is ambiguous');
    expect(() => new HfTokenizer(tokJson(VOCAB, [{ id: 3, content: '<sep>' }]), {}, { source: 'add/tokenizer.json' })).toThrow(
      'add/tokenizer.json: added token "<sep>" has id 3, which model.vocab gives to "the", so decoding 3 is ambiguous',
    );
    expect(() => new HfTokenizer(tokJson(VOCAB, [{ id: 8, content: '<x>' }, { id: 8, content: '<y>' }]))).toThrow('duplicate id 8 in added_tokens');
    // The consistent file decodes each id to its own piece.
    const tok = new HfTokenizer(tokJson(VOCAB));
    expect(tok.decode([3, 4, 5, 6, 3, 7])).toBe('the cat sat on the mat');
  });

  it('refuses a piece listed twice in model.vocab (which JSON.parse would silently collapse)', async () => {
    const d = join(tmp, 'tokdupkey');
    mkdirSync(d, { recursive: true });
    const text = JSON.stringify(tokJson(VOCAB)).replace('"mat":7', '"mat":7,"m\\u0061t":9');
    expect(JSON.parse(text).model.vocab.mat).toBe(9);
    writeFileSync(join(d, 'tokenizer.json'), text);
    const err = await HfTokenizer.fromFile(d).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(KvpackError);
    expect((err as KvpackError).message).toBe(
      `${join(d, 'tokenizer.json')}: model.vocab lists piece "mat" twice, with ids 7 and 9; JSON keeps only the last, so id 7 would decode to nothing`,
    );
    expect(findDuplicateVocabPiece(JSON.stringify(tokJson(VOCAB)))).toBeNull();
    expect(findDuplicateVocabPiece('{"model":{"vocab":{"a":0,"b":1,"a":2},"merges":[["a","b"]]},"x":{"a":1,"a":2}}')).toEqual({ piece: 'a', ids: ['0', '2'] });
  });

  it('a tokenizer.json with a duplicate id fails loadHfModel with a named error and no leak', async () => {
    const d = join(tmp, 'tokdup');
    const ck = tinyCheckpoint({ ...SPEC, vocabSize: 8 }, 2);
    writeHfDir(d, ck);
    writeFileSync(join(d, 'tokenizer.json'), JSON.stringify(tokJson({ ...VOCAB, mat: 6 })));
    const err = await mustBeNamed(tally, () => loadHfModel(d), (m) => releaseWeights(m.weights));
    expect((err as KvpackError).message).toBe(`${join(d, 'tokenizer.json')}: duplicate id 6 in model.vocab: both "on" and "mat" map to it, so decoding 6 is ambiguous`);
  });

  it('random id edits give a tokenizer whose ids each decode to one piece, or a KvpackError', async () => {
    const base = HAVE_RULER ? JSON.parse(readFileSync(join(RULER, 'tokenizer.json'), 'utf8')) : tokJson(VOCAB);
    const pieces = Object.keys(base.model.vocab as Record<string, number>);
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.oneof(
            fc.record({ piece: fc.constantFrom(...pieces), id: fc.oneof(fc.nat(pieces.length + 3), fc.integer(), fc.constant(-1)) }),
            fc.record({ swap: fc.constantFrom(...pieces), with: fc.constantFrom(...pieces) }),
            fc.record({ piece: fc.constantFrom(...pieces), fresh: fc.nat(1000) }),
          ),
          { minLength: 1, maxLength: 3 },
        ),
        fc.option(fc.record({ at: fc.nat(2), id: fc.nat(pieces.length + 3) })),
        async (edits, addedEdit) => {
          const j = structuredClone(base);
          const v = j.model.vocab as Record<string, number>;
          for (const e of edits) {
            if ('swap' in e) [v[e.swap], v[e.with]] = [v[e.with], v[e.swap]];
            else if ('fresh' in e) v[e.piece] = pieces.length + 3 + e.fresh * 4 + edits.indexOf(e); // unused id
            else v[e.piece] = e.id;
          }
          if (addedEdit && j.added_tokens[addedEdit.at]) j.added_tokens[addedEdit.at].id = addedEdit.id;
          const err = await mustBeNamed(tally, () => new HfTokenizer(j, {}, { source: 'fuzz/tokenizer.json' }));
          if (err === null) {
            // Accepted: no id names two different pieces.
            const byId = new Map<number, string>();
            for (const [p, id] of Object.entries(j.model.vocab as Record<string, number>)) {
              expect(byId.get(id) ?? p).toBe(p);
              byId.set(id, p);
            }
          }
        },
      ),
      { seed: 0x70ce, numRuns: 150 },
    );
    expect(tally.other).toBe(0);
    expect(tally.named).toBeGreaterThan(10);
    expect(tally.loaded).toBeGreaterThan(10);
  });
});
