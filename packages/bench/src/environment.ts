import { cpus } from 'node:os';

/** kvpack's version as written into bench reports. */
export const VERSION = '0.1.0';

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
