import { cpus } from 'node:os';
import { Option } from 'commander';
import { backendCandidateNames } from '@kvpack/core';
import { KVPACK_VERSION } from './version.js';

/** The `--backend` option every bench command takes: `auto` or a registered tfjs backend. */
export function backendOption(): Option {
  return new Option('--backend <name>', 'tfjs backend').choices(['auto', ...backendCandidateNames()]);
}

/** kvpack's version as written into bench reports. */
export const VERSION = KVPACK_VERSION;

/** Where and when a bench ran: backend, Node, platform, CPU count, date, kvpack version. */
export function runEnvironment(backend: string, backendLine: string, quick: boolean) {
  return {
    backend,
    backendLine,
    node: process.version,
    platform: process.platform,
    arch: process.arch,
    cpus: cpus().length,
    date: new Date().toISOString(),
    kvpackVersion: VERSION,
    quick,
  };
}
