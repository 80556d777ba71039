import cliProgress from 'cli-progress';
import type { RunHooks, SettingResult } from './runner.js';

/** True when a live progress bar suits the stream: a TTY and not CI (env CI unset or "false"). */
export function progressBarEnabled(stream: NodeJS.WriteStream = process.stderr, env: NodeJS.ProcessEnv = process.env): boolean {
  const ci = env.CI !== undefined && env.CI !== '' && env.CI !== 'false' && env.CI !== '0';
  return Boolean(stream.isTTY) && !ci;
}

/** One log line for a finished setting (printed instead of the bar in CI and pipes). */
export function settingLine(r: SettingResult, index: number, total: number): string {
  const e = (x: number | null) => (x === null ? 'N/A' : x.toFixed(4));
  if (r.error !== undefined) return `[${index + 1}/${total}] ${r.label}: FAILED: ${r.error}`;
  return (
    `[${index + 1}/${total}] ${r.label}: ratio ${r.ratio.toFixed(2)}×, key err ${e(r.keyError)}, value err ${e(r.valueError)}, ` +
    `ΔNLL ${r.deltaNll >= 0 ? '+' : ''}${r.deltaNll.toFixed(4)}, top-1 ${r.top1Agreement.toFixed(3)}, greedy ${r.agreement === null ? '–' : r.agreement.toFixed(3)}, ` +
    `${r.compressMs.toFixed(1)} ms`
  );
}

/**
 * Progress reporting for {@link runBench} on stderr: a cli-progress bar on a TTY outside CI, else
 * one line per finished setting. Call `stop()` when the run ends (or fails).
 */
export function createProgress(
  stream: NodeJS.WriteStream = process.stderr,
  env: NodeJS.ProcessEnv = process.env,
  log: (line: string) => void = (l) => void stream.write(`${l}\n`),
): RunHooks & { stop(): void } {
  if (!progressBarEnabled(stream, env)) {
    return {
      onSettingDone: (r, i, n) => log(settingLine(r, i, n)),
      stop() {},
    };
  }
  const bar = new cliProgress.SingleBar(
    { stream, format: ' {bar} {value}/{total} | {duration_formatted} elapsed, ETA {eta_formatted} | {label}', hideCursor: true, clearOnComplete: true, etaBuffer: 20, etaAsynchronousUpdate: true },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    onStart(total) {
      bar.start(total, 0, { label: 'compressing' });
      started = true;
    },
    onStep(done, total, label) {
      if (!started) {
        bar.start(total, 0, { label });
        started = true;
      }
      bar.update(done, { label });
    },
    stop() {
      if (started) bar.stop();
    },
  };
}
