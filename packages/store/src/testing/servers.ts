// Real redis-server / valkey-server processes on loopback ports, for the store's tests.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';

/** Absolute path of an executable on PATH (or /usr/sbin, /usr/bin), or undefined. */
export function findBinary(name: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/sbin', '/usr/bin', '/usr/local/bin'];
  for (const d of dirs) if (d && existsSync(join(d, name))) return join(d, name);
  return undefined;
}

/** A TCP port free on 127.0.0.1 right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      s.close(() => (typeof a === 'object' && a ? resolve(a.port) : reject(new Error('no port'))));
    });
  });
}

/** Sends one inline command and returns the first reply line. */
export function rawCommand(port: number, command: string, timeoutMs = 1000): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = createConnection({ host: '127.0.0.1', port });
    const timer = setTimeout(() => {
      c.destroy();
      reject(new Error('timeout'));
    }, timeoutMs);
    let buf = '';
    c.on('connect', () => c.write(command + '\r\n'));
    c.on('data', (d) => {
      buf += d.toString('latin1');
      const eol = buf.indexOf('\r\n');
      if (eol < 0) return;
      const complete = buf[0] !== '$' || Number(buf.slice(1, eol)) < 0 || buf.length >= eol + 2 + Number(buf.slice(1, eol)) + 2;
      if (complete) {
        clearTimeout(timer);
        c.end();
        resolve(buf);
      }
    });
    c.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

/** Options of {@link startServer}. */
export interface ServerOptions {
  /** AOF with fsync on every write, so that a restart after SIGKILL finds what was acknowledged. */
  persistence?: boolean;
  /** Cluster mode (one master to be joined by {@link startCluster}). */
  cluster?: boolean;
  /** More `--name value` settings. */
  extra?: string[];
}

/** A running server; `restart` starts it again on the same port and folder. */
export class TestServer {
  proc: ChildProcess | undefined;
  constructor(
    readonly binary: string,
    readonly port: number,
    readonly dir: string,
    readonly args: string[],
  ) {}

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  async start(): Promise<void> {
    this.proc = spawn(this.binary, this.args, { cwd: this.dir, stdio: 'ignore' });
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        const r = await rawCommand(this.port, 'PING', 300);
        if (r.startsWith('+PONG')) return;
      } catch {}
      if (this.proc.exitCode !== null) throw new Error(`${this.binary} exited with code ${this.proc.exitCode} (port ${this.port})`);
      if (Date.now() > deadline) throw new Error(`${this.binary} did not answer PING on port ${this.port}`);
      await new Promise((r) => setTimeout(r, 30));
    }
  }

  /** Kills the process (SIGKILL by default) and waits for it to exit. */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    await new Promise<void>((resolve) => {
      p.once('exit', () => resolve());
      p.kill(signal);
    });
  }

  async restart(): Promise<void> {
    await this.kill();
    await this.start();
  }

  async stop(): Promise<void> {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Starts `binary` (redis-server or valkey-server) on a free loopback port in a temporary folder; no persistence unless asked. */
export async function startServer(binary: string, options: ServerOptions = {}): Promise<TestServer> {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'kvpack-redis-'));
  const args = [
    '--port', String(port),
    '--bind', '127.0.0.1',
    '--dir', dir,
    '--save', '',
    '--appendonly', options.persistence ? 'yes' : 'no',
    ...(options.persistence ? ['--appendfsync', 'always'] : []),
    ...(options.cluster ? ['--cluster-enabled', 'yes', '--cluster-config-file', `nodes-${port}.conf`, '--cluster-node-timeout', '1000', '--cluster-require-full-coverage', 'no'] : []),
    '--protected-mode', 'no',
    ...(options.extra ?? []),
  ];
  const s = new TestServer(binary, port, dir, args);
  await s.start();
  return s;
}

/**
 * Three cluster-mode masters joined into one Redis Cluster: slots 0–5460, 5461–10922 and
 * 10923–16383 (CLUSTER ADDSLOTSRANGE, CLUSTER MEET), waited on until every node reports
 * cluster_state:ok and knows the three.
 */
export async function startCluster(binary: string): Promise<TestServer[]> {
  const nodes: TestServer[] = [];
  for (let i = 0; i < 3; i++) nodes.push(await startServer(binary, { cluster: true }));
  const ranges = [[0, 5460], [5461, 10922], [10923, 16383]];
  for (let i = 0; i < 3; i++) await rawCommand(nodes[i].port, `CLUSTER ADDSLOTSRANGE ${ranges[i][0]} ${ranges[i][1]}`);
  for (let i = 1; i < 3; i++) await rawCommand(nodes[0].port, `CLUSTER MEET 127.0.0.1 ${nodes[i].port}`);
  const deadline = Date.now() + 20_000;
  for (;;) {
    const infos = await Promise.all(nodes.map((n) => rawCommand(n.port, 'CLUSTER INFO').catch(() => '')));
    if (infos.every((t) => t.includes('cluster_state:ok') && t.includes('cluster_known_nodes:3'))) return nodes;
    if (Date.now() > deadline) throw new Error('the three-master test cluster did not reach cluster_state:ok');
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** redis-server, else valkey-server, with the message a test prints when neither is installed. */
export const SKIP_MESSAGE = (name: string) => `SKIPPED: ${name} is not installed (apt-get install -y redis-server valkey-server); the real-server store tests did not run`;
