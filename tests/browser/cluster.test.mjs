// The console's cluster view in headless Chromium against real parts: a
// real NATS JetStream node (tests/browser/nats.mjs) and two `sluice`
// brokers in cluster mode on it. Broker A's console, signed in with the
// root token, lists both brokers, A first as this one, each with its
// applied token-bucket revision and lag; a token minted in the console on
// A reaches B (lag 0 in the view, and the token works on B). With NATS
// stopped the view says A's token view is stale and the console goes on
// working (its figures too, though each read of /cluster is slow then);
// with NATS back the warning clears. An application token's
// broker view has no cluster section and never asks for `/cluster`.
// Screenshots go to artifacts/.
//
// It needs nats-server (SLUICE_NATS_SERVER, exported by `.ci/prepare`
// with SLUICE_NEED_NATS=1) and fails, saying so, without it.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launch, shot, assertNoSecretKept, card, takeSecret, signIn, pageErrors } from './browser.mjs';
import { Nats } from './nats.mjs';
import { ADMIN, startServer, postState } from './server.mjs';

/**
 * Node ids chosen so that A sorts after B: A listed first shows the view
 * puts this broker first, not merely the alphabet.
 */
const A_ID = 'west';
const B_ID = 'east';
const STALE_NOTE = 'This broker has lost its view of the cluster\'s tokens and refuses requests until it is back.';
/** Waits on the view, which rereads /cluster every 2 s; allows a few reads. */
const VIEW_TIMEOUT = 30000;
/**
 * While NATS is down each `GET /cluster` answers only after the broker's
 * probe of the ingest stream has timed out (10 s, NATS's request timeout):
 * a read begun just before the view went stale still says live, so the
 * warning can take two such reads.
 */
const OUTAGE_TIMEOUT = 60000;

let nats;
let a;
let b;
let chrome;

/** A broker in cluster mode on `nats`, with the Rust cluster tests' short timings. */
function broker(nodeId) {
  return startServer({
    args: ['--cluster', nats.url],
    env: {
      SLUICE_CLUSTER__PREFIX: 'console',
      SLUICE_CLUSTER__NODE_ID: nodeId,
      // One NATS node holds one replica (see nats.mjs).
      SLUICE_CLUSTER__REPLICAS: '1',
      SLUICE_CLUSTER__HEARTBEAT: '250ms',
      SLUICE_CLUSTER__STALE_AFTER: '1s',
    },
  });
}

before(async () => {
  nats = await Nats.start();
  a = await broker(A_ID);
  b = await broker(B_ID);
  chrome = await launch();
});

after(async () => {
  if (chrome) await chrome.close();
  // Brokers first, while NATS still runs, so they leave the registry.
  for (const s of [a, b]) if (s) await s.stop();
  if (nats) await nats.close();
});

async function clusterOf(server) {
  const res = await fetch(`${server.admin}/cluster`, { headers: { Authorization: `Bearer ${ADMIN}` } });
  assert.equal(res.status, 200);
  return res.json();
}

/**
 * The brokers the view lists, in its order: `{id, self, applied, lag,
 * state}` read from the table's cells.
 */
function listed(page) {
  return page.locator('table.nodes tbody tr').evaluateAll((rows) => rows.map((r) => {
    const cells = r.querySelectorAll('th, td');
    const number = (el) => Number(el.textContent.replaceAll(',', ''));
    return {
      id: cells[0].querySelector('code').textContent,
      self: cells[0].textContent.endsWith('(this one)'),
      applied: number(cells[1]),
      lag: number(cells[2]),
      state: cells[4].textContent,
    };
  }));
}

/** Polls the view until `ok(listed)` holds; returns what it listed then. */
async function viewShows(page, what, ok) {
  const deadline = Date.now() + VIEW_TIMEOUT;
  let last;
  for (;;) {
    last = await listed(page);
    if (ok(last)) return last;
    assert.ok(Date.now() < deadline, `the cluster view never showed ${what}; last: ${JSON.stringify(last)}`);
    await page.waitForTimeout(200);
  }
}

/**
 * Waits for the page's next whole read of /cluster in `trail` after entry
 * `from`, and returns the paths requested while it waited for its answer.
 */
async function duringNextClusterRead(page, trail, from) {
  const deadline = Date.now() + OUTAGE_TIMEOUT;
  for (;;) {
    const seen = trail.slice(from);
    const start = seen.indexOf('> /cluster');
    const end = start < 0 ? -1 : seen.indexOf('< /cluster', start);
    if (end >= 0) return seen.slice(start + 1, end).filter((e) => e.startsWith('> ')).map((e) => e.slice(2));
    assert.ok(Date.now() < deadline, `no whole read of /cluster: ${seen.join(' ')}`);
    await page.waitForTimeout(200);
  }
}

function view(page, name) {
  return page.getByRole('navigation', { name: 'Views' }).getByRole('button', { name }).click();
}

test('an application token\'s broker view has no cluster section', async () => {
  const res = await fetch(`${a.admin}/applications/farm/tokens`, {
    method: 'POST', headers: { Authorization: `Bearer ${ADMIN}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ name: 'ops', scope: ['device.sendState', 'device.getState', 'token.read'] }),
  });
  assert.equal(res.status, 201);
  const ops = await res.json();

  const page = await chrome.context.newPage();
  const asked = [];
  page.on('request', (r) => asked.push(new URL(r.url()).pathname));
  await signIn(page, a.admin, ops.token);
  await page.getByText('Application farm').waitFor();
  await view(page, 'Broker');
  await page.locator('.stat', { hasText: 'Ack latency' }).waitFor();
  await page.getByRole('heading', { name: 'Refusals by reason' }).waitFor();
  // A second scrape, so the view had every chance to ask for /cluster.
  await page.waitForRequest((r) => r.url().endsWith('/metrics'));
  await page.waitForTimeout(500);
  assert.equal(await page.getByRole('heading', { name: 'Cluster' }).count(), 0);
  assert.equal(await page.locator('table.nodes').count(), 0);
  assert.equal(await page.getByText('Standalone broker').count(), 0);
  assert.ok(!asked.includes('/cluster'), `the view asked for /cluster: ${asked.join(' ')}`);
  await shot(page, '13-cluster-app-token');
  await assertNoSecretKept(chrome, page, [ADMIN, ops.token]);
  await page.close();
});

test('root watches both brokers, a mint reaching B, and a NATS outage', async () => {
  const page = await chrome.context.newPage();
  /** Requests (`> path`) and their ends (`< path`), in order. */
  const trail = [];
  const path = (r) => new URL(r.url()).pathname;
  page.on('request', (r) => trail.push(`> ${path(r)}`));
  page.on('requestfinished', (r) => trail.push(`< ${path(r)}`));
  page.on('requestfailed', (r) => trail.push(`< ${path(r)}`));
  await signIn(page, a.admin, ADMIN);
  await page.getByLabel('Application id').fill('fleet');
  await page.getByRole('button', { name: 'Open' }).click();
  await page.getByText('This application has no tokens yet').waitFor();

  // Both brokers, A first as this one, live and level.
  await view(page, 'Broker');
  await page.getByRole('heading', { name: 'Cluster' }).waitFor();
  const level = await viewShows(page, 'both brokers live and level', (n) => n.length === 2
    && n.every((x) => x.state === 'live' && x.lag === 0) && n[0].applied === n[1].applied);
  assert.deepEqual(level.map((x) => [x.id, x.self]), [[A_ID, true], [B_ID, false]]);
  assert.equal(await page.getByText(STALE_NOTE).count(), 0);
  const rev0 = level[0].applied;
  // What A shows of itself is what A's /cluster says.
  assert.equal((await clusterOf(a)).applied, rev0);

  // A token minted in the console on A...
  await view(page, 'Tokens');
  await page.getByRole('button', { name: 'Mint token' }).click();
  const dlg = page.getByRole('dialog', { name: 'Mint a token' });
  await dlg.getByLabel('Name').fill('sensor');
  await dlg.getByLabel('device.sendState').check();
  await dlg.getByRole('button', { name: 'Mint' }).click();
  const secret = await takeSecret(page);
  await card(page, 'sensor').waitFor();

  // ...moves A to a newer revision, and the view shows B reach it.
  await view(page, 'Broker');
  const reached = await viewShows(page, 'B at A\'s new revision', (n) => n.length === 2
    && n[0].applied > rev0 && n[1].applied === n[0].applied && n.every((x) => x.lag === 0 && x.state === 'live'));
  assert.deepEqual(reached.map((x) => x.id), [A_ID, B_ID]);
  const rev1 = reached[0].applied;
  // B itself says it has applied it, and serves the new token.
  const seenByB = await clusterOf(b);
  assert.equal(seenByB.nodeId, B_ID);
  assert.ok(seenByB.applied >= rev1, `B says it applied ${seenByB.applied}, the view showed ${rev1}`);
  assert.equal((await postState(b, secret, 'fleet', 'd1', { data: { t: 1 } })).status, 200);
  await page.getByText(`Token bucket revision ${rev1.toLocaleString('en-US')} is the newest any broker applied`).waitFor();
  await shot(page, '14-cluster');

  // NATS stops: A's view of the tokens goes stale, and the view says so.
  await nats.stop();
  await page.getByText(STALE_NOTE).waitFor({ timeout: OUTAGE_TIMEOUT });
  await viewShows(page, 'both brokers stale', (n) => n.length === 2 && n.every((x) => x.state === 'stale'));
  assert.equal((await clusterOf(a)).stale, true);
  await shot(page, '15-cluster-stale');
  // The console goes on working: the tokens view says why it cannot
  // list them, and the operator stays signed in.
  await view(page, 'Tokens');
  await page.getByText('Could not list tokens: unavailable').waitFor();
  await view(page, 'Broker');
  await page.getByText(STALE_NOTE).waitFor({ timeout: OUTAGE_TIMEOUT });
  assert.ok(await page.getByRole('button', { name: 'Sign out' }).isVisible());
  // The broker's figures do not wait for the slow /cluster: /metrics is
  // scraped again while a read of /cluster waits for its answer.
  const during = await duringNextClusterRead(page, trail, trail.length);
  assert.ok(during.includes('/metrics'), `no scrape of /metrics during a read of /cluster: ${during.join(' ')}`);

  // NATS back on the same ports and store: the warning clears by itself.
  await nats.restart();
  await page.getByText(STALE_NOTE).waitFor({ state: 'detached', timeout: OUTAGE_TIMEOUT });
  const back = await viewShows(page, 'both brokers live again', (n) => n.length === 2
    && n.every((x) => x.state === 'live' && x.lag === 0 && x.applied >= rev1));
  assert.deepEqual(back.map((x) => [x.id, x.self]), [[A_ID, true], [B_ID, false]]);
  await shot(page, '16-cluster-back');
  await view(page, 'Tokens');
  await card(page, 'sensor').waitFor();

  await assertNoSecretKept(chrome, page, [ADMIN, secret]);
  // No script error at all; the only failed loads are the tokens view's
  // refused reads while the view was stale (503).
  const errors = pageErrors(chrome);
  assert.ok(!errors.some((l) => l.startsWith('pageerror')), `script errors: ${errors.join('\n')}`);
  const unexpected = errors.filter((l) => !/Failed to load resource: .* 503 /.test(l));
  assert.deepEqual(unexpected, [], `errors in the page: ${unexpected.join('\n')}`);
  await page.close();
});
