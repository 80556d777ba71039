import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { decodeSessionFile, defaultModelPaths, encodeSessionFile } from './generate.js';
import { runCli } from './program.js';
import type { CommandIO } from './commands.js';

function capture(): CommandIO & { stdout: string; stderr: string } {
  const io = {
    stdout: '',
    stderr: '',
    write: (t: string) => void (io.stdout += t),
    out: (t: string) => void (io.stdout += `${t}\n`),
    err: (t: string) => void (io.stderr += `${t}\n`),
  };
  return io;
}

const paths = defaultModelPaths();
const HAVE = existsSync(paths.model) && existsSync(paths.tokenizer);
const SKIP = HAVE ? '' : ` (SKIPPED: ${paths.model} not found; set KVPACK_MODELS_DIR)`;

describe.skipIf(!HAVE)(`kvpack generate on stories260K${SKIP}`, () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvpack-generate-'));
  // The README's strategy file: xKV-4 at a target ratio of 4.
  const strategy = fileURLToPath(new URL('../../../examples/xkv-generate.yaml', import.meta.url));
  const prompt = 'Once upon a time, there was a little girl named Lily.';
  const run = async (args: string[]) => {
    const io = capture();
    const code = await runCli(['generate', '--backend', 'wasm', ...args], io);
    return { code, ...io };
  };

  it('save → load continues with exactly the tokens of an uninterrupted run', async () => {
    const whole = await run(['--prompt', prompt, '--strategy', strategy, '--max-tokens', '20', '--save-cache', join(dir, 'whole.kvs')]);
    expect(whole.code, whole.stderr).toBe(0);
    const ratio = Number(/compressed (\d+\.\d+)× against dense fp16/.exec(whole.stderr)?.[1]);
    expect(ratio).toBeGreaterThanOrEqual(4);
    const first = await run(['--prompt', prompt, '--strategy', strategy, '--max-tokens', '8', '--save-cache', join(dir, 'first.kvs')]);
    expect(first.code, first.stderr).toBe(0);
    const rest = await run(['--load-cache', join(dir, 'first.kvs'), '--max-tokens', '12', '--save-cache', join(dir, 'rest.kvs')]);
    expect(rest.code, rest.stderr).toBe(0);
    expect(rest.stderr).toMatch(/^kvpack generate: 12 tokens \(maxNewTokens\) after 1 fed; xkv cache of 35 positions/);
    // The streamed text: the two halves make the whole.
    expect(whole.stdout.length).toBeGreaterThan(prompt.length / 2);
    expect(first.stdout.slice(0, -1) + rest.stdout).toBe(whole.stdout);
    // The token ids and the compressed cache itself: byte for byte the uninterrupted run's.
    const a = decodeSessionFile(readFileSync(join(dir, 'whole.kvs')), 'whole');
    const b = decodeSessionFile(readFileSync(join(dir, 'rest.kvs')), 'rest');
    expect(a.header!.tokens).toHaveLength(35);
    expect([...b.header!.tokens, ...b.header!.pending]).toEqual([...a.header!.tokens, ...a.header!.pending]);
    expect(b.header!.strategy).toBe('xkv');
    expect(Buffer.compare(Buffer.from(a.cache), Buffer.from(b.cache))).toBe(0);
  });

  it('bad input: exit 2 with one error line', async () => {
    const both = await run(['--load-cache', join(dir, 'none.kvs'), '--strategy', 'xkv', '--prompt', 'x']);
    expect(both.code).toBe(2);
    expect(both.stderr).toMatch(/^kvpack: error: --strategy does not apply to --load-cache/);
    const none = await run(['--max-tokens', '2']);
    expect(none.code).toBe(2);
    expect(none.stderr).toMatch(/pass --prompt TEXT or --chat FILE/);
    const missing = await run(['--load-cache', join(dir, 'none.kvs')]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/cannot read .*none\.kvs/);
    const chat = join(dir, 'chat.json');
    writeFileSync(chat, JSON.stringify([{ role: 'user', content: 'Tell me a story.' }]));
    const other = await run(['--chat', chat, '--load-cache', join(dir, 'first.kvs')]);
    expect(other.code).toBe(2);
    expect(other.stderr).toMatch(/the chat does not begin with the \d+ tokens cached/);
    const corrupt = join(dir, 'corrupt.kvs');
    const bytes = readFileSync(join(dir, 'first.kvs'));
    bytes[bytes.length - 5] ^= 0x10;
    writeFileSync(corrupt, bytes);
    const bad = await run(['--load-cache', corrupt]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/^kvpack: error: .*(corrupt|checksum)/);
  });
});

describe('session files', () => {
  const header = { format: 'kvpack-session' as const, version: 2 as const, tokens: [1, 2, 3], pending: [414], strategy: 'dense' };
  const cache = Uint8Array.from([0x4b, 0x56, 0x50, 0x4b, 9, 9, 9]); // a stand-in that starts like a container
  it('round-trip their header; a changed token id or pending token fails the header CRC', () => {
    const file = encodeSessionFile(header, cache);
    const d = decodeSessionFile(file, 's.kvs');
    expect(d.header).toEqual(header);
    expect([...d.cache]).toEqual([...cache]);
    const text = new TextDecoder().decode(file);
    const at = text.indexOf('414');
    const bad = file.slice();
    bad[at + 2] = '5'.charCodeAt(0); // "pending":[415]
    expect(() => decodeSessionFile(bad, 's.kvs')).toThrow(/s\.kvs: the session header fails its CRC-32/);
    expect(() => decodeSessionFile(file.subarray(0, 20), 's.kvs')).toThrow(/session header claims \d+ bytes/);
  });
  it('a bare cache passes through; any other file is named as neither', () => {
    expect(decodeSessionFile(cache, 'c.kvpk')).toEqual({ header: null, cache });
    expect(() => decodeSessionFile(new TextEncoder().encode('# README\n'), 'README.md')).toThrow(/README\.md is not a kvpack session or cache file/);
    expect(() => decodeSessionFile(new Uint8Array(0), 'empty')).toThrow(/not a kvpack session or cache file/);
    expect(() => decodeSessionFile(new TextEncoder().encode('KVPSESS1\0\0\0\0'), 'old.kvs')).toThrow(/first format, whose header had no checksum/);
  });
});
