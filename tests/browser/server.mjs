// Starts the real `sluice` binary on port 0 with a temp data dir, as the
// Rust integration tests do (tests/integration/common.rs), and reads the
// `listening` lines to find its addresses.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

export const ADMIN = 'browser-test-admin-token-0123456789abcdef';

/** The debug binary `cargo test` built, unless SLUICE_BIN names another. */
export function binary() {
  if (process.env.SLUICE_BIN) return process.env.SLUICE_BIN;
  const target = process.env.CARGO_TARGET_DIR || join(homedir(), '.cache', 'sluice', 'target');
  return join(target, 'debug', 'sluice');
}

/**
 * Starts a broker; `args` are added to `serve`'s flags and `env` to the
 * environment (e.g. cluster mode: `['--cluster', url]` and its
 * `SLUICE_CLUSTER__*` keys).
 */
export async function startServer({ args = [], env = {} } = {}) {
  const bin = binary();
  if (!existsSync(bin)) throw new Error(`no sluice binary at ${bin}: build it (cargo build) or set SLUICE_BIN`);
  const dir = mkdtempSync(join(tmpdir(), 'sluice-browser-'));
  const child = spawn(bin, ['serve', '--data-dir', dir,
    '--http-listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--mqtt-listen', '127.0.0.1:0', ...args], {
    env: { ...process.env, SLUICE_ADMIN_TOKEN: ADMIN, RUST_LOG: 'warn', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; });
  const exited = new Promise((r) => child.once('exit', r));
  /** SIGTERM, and SIGKILL if it has not exited 10 s later. */
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const late = setTimeout(() => child.kill('SIGKILL'), 10000);
      await exited;
      clearTimeout(late);
    }
    rmSync(dir, { recursive: true, force: true });
  };
  const addrs = {};
  const lines = createInterface({ input: child.stdout });
  try {
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`sluice did not start: ${stderr}`)), 60000);
      child.on('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`sluice exited (${code}) before listening: ${stderr}`));
      });
      lines.on('line', (line) => {
        const [word, kind, addr] = line.split(' ');
        if (word === 'listening') addrs[kind] = addr;
        if (addrs.http && addrs.admin && addrs.mqtt) {
          clearTimeout(timer);
          resolve();
        }
      });
    });
  } catch (e) {
    // A broker that did not come up is not left running.
    await stop();
    throw e;
  }
  return {
    admin: `http://${addrs.admin}`,
    http: `http://${addrs.http}`,
    stderr: () => stderr,
    stop,
  };
}

/** Posts state as a device would, on the device listener. */
export async function postState(server, token, app, device, body) {
  const res = await fetch(`${server.http}/applications/${app}/devices/${device}/state`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
}
