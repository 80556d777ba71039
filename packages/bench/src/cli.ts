#!/usr/bin/env node
import { KVPACK_VERSION } from './version.js';

// The `kvpack` executable (ESM). Exit codes: 0 ok, 1 regression, 2 bad input, 3 internal error.
// `--version` answers before anything else loads (tfjs takes seconds to start).
const argv = process.argv.slice(2);
if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-V')) {
  process.stdout.write(`${KVPACK_VERSION}\n`);
} else {
  // Errors that escape the command (a timer, a stray rejection): one line, the error's exit code,
  // no minified dependency source. KVPACK_DEBUG=1 prints the stack.
  const fatal = (e: unknown) => {
    const err = e as { name?: string; message?: string; stack?: string };
    if (process.env.KVPACK_DEBUG && err?.stack) process.stderr.write(`${err.stack}\n`);
    const kvpack = err?.name === 'KvpackError';
    process.stderr.write(`kvpack: ${kvpack ? 'error' : 'internal error'}: ${err?.message ?? String(e)}\n`);
    process.exit(kvpack ? 2 : 3);
  };
  process.on('uncaughtException', fatal);
  process.on('unhandledRejection', fatal);
  import('./program.js').then(
    ({ runCli }) =>
      runCli(argv).then((code) => {
        process.exitCode = code;
      }),
    fatal,
  ).catch(fatal);
}
