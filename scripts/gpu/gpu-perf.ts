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
import { readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { Command } from 'commander';
import type { KVCache } from '@kvpack/core';
import { checkLines, peerCheck, peerChecks, perfCommand, perfMarkdown, writeGroupMatrices, type PeerResult, type PerfCommandOptions } from '@kvpack/bench';

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
