#!/usr/bin/env node
import { runCli } from './program.js';

// The `kvpack` executable (ESM). Exit codes: 0 ok, 1 regression, 2 bad input, 3 internal error.
runCli(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    process.stderr.write(`kvpack: internal error: ${(e as Error)?.message ?? String(e)}\n`);
    process.exitCode = 3;
  },
);
