// GPU entry of the perf suite. Bundled to one CommonJS file by scripts/gpu/bundle.sh and
// run on the GPU host (no Node there; the bundle carries it):
//
//   bash scripts/gpu/bundle.sh scripts/gpu/gpu-perf.ts gpu-bundle       (here, from the repo root, after pnpm build)
//   bash gpu-bundle/run.sh --out /tmp/perf-gpu --peer scripts/gpu/xkv_torch.py   (on the GPU host)
//
// Runs the perf suite on the webgpu backend (default T = 32K, 8 layers = two xKV groups, 3 timed
// runs after 1 warm-up, the compression check at T = 32K), writes OUT/perf.json and OUT/perf.md,
// and with --matrices/--peer writes the check's group matrices X_K, X_V [T, 4096] as raw float32
// and runs the PyTorch peer on them in the same run, adding the line "compress K+V … = Z×
// torch.svd_lowrank(q=512, niter=2) on the same matrices (target ≤ 2×)". --quick: a local smoke
// run (T = 1,024, 1 timed run, checks at 1K/2K). No top-level await (CJS bundle).
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { Command } from 'commander';
import { selectBackend, type KVCache } from '@kvpack/core';
import { MODEL_DECODE_SETTINGS, checkLines, modelDecodeMarkdown, peerCheck, peerChecks, perfCommand, runModelDecodeBench, type ModelDecodeSetting, perfMarkdown, writeGroupMatrices, type PeerResult, type PerfCommandOptions } from '@kvpack/bench';

async function main(): Promise<void> {
  const program = new Command('gpu-perf')
    .option('--backend <name>', 'tfjs backend', 'webgpu')
    .option('--tokens <list>', 'prefill lengths (default 32768; --quick 1024)')
    .option('--strategies <list>', 'strategies (default all)')
    .option('--layers <n>', 'layers per cache (default 8: two xKV groups)')
    .option('--reps <n>', 'timed runs (default 3; --quick 1)')
    .option('--warmup <n>', 'warm-up runs (default 1)')
    .option('--sparse-budget <n>', 'sparse decode budget (default 2048)')
    .option('--out <dir>', 'folder for perf.json and perf.md', 'perf-gpu-out')
    .option('--matrices <dir>', "write the compression check's group matrices here (raw float32, 2 × 512 MiB at 32K) for the peer; default a folder under the system temp dir")
    .option('--no-checks', "skip the target checks (and the peer)")
    .option('--peer <script>', 'run this PyTorch peer (xkv_torch.py) on the matrices, in this run')
    .option('--python <exe>', 'python for the peer', 'python3')
    .option('--baselines <labels>', 'perf settings also compressed on the check cache and by the peer', 'kivi 2-bit,minicache,snapkv 2048')
    .option('--quick', 'local smoke run: T = 1024, 1 timed run, checks at 1K / 2K')
    .option('--no-perf', 'skip the perf suite (e.g. to run only the whole-model decode benchmark)')
    .option('--model-decode <batches>', 'also run the whole-model decode benchmark (Llama-3.1-8B-shaped, T = 32K) at these batch sizes, e.g. 1,8')
    .option('--model-tokens <n>', 'cached tokens per sequence of the whole-model benchmark (default 32768; --quick 512)')
    .option('--device-name <words>', 'the card, for the whole-model table (default: from nvidia-smi)')
    .parse(process.argv);
  const a = program.opts<{
    backend: string;
    tokens?: string;
    strategies?: string;
    layers?: string;
    reps?: string;
    warmup?: string;
    sparseBudget?: string;
    out: string;
    matrices?: string;
    peer?: string;
    python: string;
    baselines: string;
    quick?: boolean;
    checks: boolean;
    perf: boolean;
    modelDecode?: string;
    modelTokens?: string;
    deviceName?: string;
  }>();
  const quick = Boolean(a.quick);
  const tokens = a.tokens ?? (quick ? '1024' : '32768');
  const tmax = Math.max(...tokens.split(',').map((t) => (/k$/i.test(t.trim()) ? Number(t.trim().slice(0, -1)) * 1024 : Number(t))));
  const opts: PerfCommandOptions = {
    backend: a.backend,
    tokens,
    strategies: a.strategies,
    layers: a.layers ?? (quick ? 4 : 8),
    reps: a.reps ?? (quick ? 1 : 3),
    warmup: a.warmup ?? 1,
    sparseBudget: a.sparseBudget,
    out: a.out,
    quick,
    checks: a.checks,
  };
  if (a.perf) await perfRun(a, quick, tokens, tmax, opts);
  if (a.modelDecode) await modelDecodeRun(a, quick);
}

async function modelDecodeRun(a: { backend: string; out: string; modelDecode?: string; modelTokens?: string; deviceName?: string }, quick: boolean): Promise<void> {
  await selectBackend(a.backend);
  const device = a.deviceName ?? (spawnSync('nvidia-smi', ['--query-gpu=name', '--format=csv,noheader'], { encoding: 'utf8' }).stdout?.split('\n')[0]?.trim() || 'unknown device');
  const r = await runModelDecodeBench({
    ...(quick ? { shape: { nLayers: 4, nHeads: 8, nKvHeads: 2, headDim: 64, hidden: 512, ffn: 1024, vocab: 1000 } } : {}),
    tokens: Number(a.modelTokens ?? (quick ? 512 : 32768)),
    batches: a.modelDecode!.split(',').map(Number),
    ...(quick ? { settings: MODEL_DECODE_SETTINGS.map(quickSetting) } : {}),
    log: (l) => process.stderr.write(`${l}\n`),
  });
  const md = modelDecodeMarkdown(r, device);
  const out = resolve(a.out);
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, 'model-decode.json'), `${JSON.stringify({ device, date: new Date().toISOString(), ...r }, null, 2)}\n`);
  writeFileSync(join(out, 'model-decode.md'), `${md}\n`);
  process.stdout.write(`${md}\n`);
}

/** A setting at the --quick shape's sizes (ranks within head_dim·H_kv, a sparse budget within T). */
function quickSetting(s: ModelDecodeSetting): ModelDecodeSetting {
  if (s.name !== 'xkv') return s;
  const options: Record<string, unknown> = { ...s.options, rankK: 16, rankV: 24 };
  if (options.sparse) options.sparse = { budget: 256, outlierChunks: 4 };
  return { ...s, options };
}

async function perfRun(
  a: { checks: boolean; matrices?: string; peer?: string; baselines: string; out: string; python: string },
  quick: boolean,
  tokens: string,
  tmax: number,
  opts: PerfCommandOptions,
): Promise<void> {
  const matrices = a.checks ? (a.matrices ?? (a.peer ? join(tmpdir(), 'kvpack-peer-matrices') : undefined)) : undefined;
  const { report } = await perfCommand(opts, undefined, {
    checkCompressTokens: quick ? 1024 : tmax,
    checkDecodeTokens: quick ? 2048 : Math.max(tmax, 32768),
    ...(matrices ? { onCheckCache: (c: KVCache) => writeGroupMatrices(c, matrices) } : {}),
    ...(a.peer ? { checkBaselines: a.baselines.split(',').map((s) => s.trim()).filter(Boolean) } : {}),
  });
  if (a.peer && matrices) {
    const peerJson = join(resolve(a.out), 'peer.json');
    process.stderr.write(`running the PyTorch peer: ${a.python} ${a.peer} --matrices ${matrices}\n`);
    const r = spawnSync(a.python, [a.peer, '--matrices', matrices, '--json', peerJson], { stdio: 'inherit' });
    if (r.status !== 0) {
      process.stderr.write(`gpu-perf: the peer failed (exit ${r.status}${r.error ? `, ${r.error.message}` : ''}); perf.json has our numbers only\n`);
    } else {
      const peer = JSON.parse(readFileSync(peerJson, 'utf8')) as PeerResult;
      report.peer = peer;
      const c = peerCheck(report, peer);
      if (c) report.checks.push(c);
      else report.unavailable.push({ label: 'compress vs torch.svd_lowrank', reason: 'no matching compression check in this run' });
      report.checks.push(...peerChecks(report, peer));
      const md = perfMarkdown(report);
      const out = resolve(a.out);
      writeFileSync(join(out, 'perf.json'), `${JSON.stringify(report, null, 2)}\n`);
      writeFileSync(join(out, 'perf.md'), `${md}\n`);
      process.stdout.write(`${checkLines(report.checks, report.unavailable).join('\n')}\n`);
    }
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`gpu-perf: ${(e as Error)?.stack ?? String(e)}\n`);
  process.exit(1);
});
