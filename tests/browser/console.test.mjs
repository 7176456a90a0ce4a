// The operator console in headless Chromium (Debian's package) against the
// real binary: sign in, mint a child under a parent, use it on the device
// listener, deactivate the parent in the console and see the child
// refused, open a device and see its chart and a live state arrive, read
// the broker's figures; and the token never reaches the URL, storage or
// cookies. Screenshots of every view go to artifacts/.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launch, shot, assertNoSecretKept, card, tokenId, takeSecret, pageErrors } from './browser.mjs';
import { ADMIN, startServer, postState } from './server.mjs';

let server;
/** Chromium, with every URL its pages requested and everything they logged. */
let chrome;

before(async () => {
  server = await startServer();
  chrome = await launch();
});

after(async () => {
  if (chrome) await chrome.close();
  if (server) await server.stop();
});

test('root signs in, mints a branch, revokes it, watches a device and the broker', async () => {
  const page = chrome.context.pages()[0] ?? await chrome.context.newPage();
  const base = server.admin;

  await page.goto(`${base}/console`);
  assert.equal(page.url(), `${base}/console/`, 'the bare path redirects to /console/');
  await shot(page, '01-sign-in');

  // A wrong token is refused with a clear message.
  await page.getByLabel('Token', { exact: true }).fill('sl_not-a-real-token');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByText('does not accept this token').waitFor();

  // Sign in with the keyboard only.
  await page.getByLabel('Token', { exact: true }).focus();
  await page.keyboard.type(ADMIN);
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Application' }).waitFor();
  assert.equal(await page.getByLabel('Token', { exact: true }).inputValue(), '', 'the password field is cleared');
  await page.getByLabel('Application id').fill('farm');
  await page.keyboard.press('Enter');
  await page.getByText('This application has no tokens yet').waitFor();
  await assertNoSecretKept(chrome, page, [ADMIN]);

  // The root mints a parent with an expiry and a rate limit.
  await page.getByRole('button', { name: 'Mint token' }).click();
  let dlg = page.getByRole('dialog', { name: 'Mint a token' });
  await dlg.getByLabel('Name').fill('gateway');
  for (const sc of ['device.getState', 'token.create']) await dlg.getByLabel(sc).check();
  const in30d = new Date(Date.now() + 30 * 86400e3);
  const local = (d) => new Date(d.getTime() - d.getTimezoneOffset() * 60e3).toISOString().slice(0, 16);
  await dlg.getByLabel('Expires').fill(local(in30d));
  await dlg.getByLabel('Per second').fill('100');
  await dlg.getByLabel('Burst').fill('200');
  await dlg.getByRole('button', { name: 'Mint' }).click();
  const gatewaySecret = await takeSecret(page, '02-new-secret');
  const gatewayId = await tokenId(page, 'gateway');

  // Its child: the form offers only what the gateway may grant...
  await card(page, 'gateway').getByRole('button', { name: 'Mint child' }).click();
  dlg = page.getByRole('dialog', { name: 'Mint a child of gateway' });
  const offered = await dlg.locator('input[name=scope]').evaluateAll((els) => els.map((e) => e.value));
  assert.deepEqual(offered, ['device.sendState', 'device.getState', 'token.create']);
  assert.equal(await dlg.getByLabel('Per second').getAttribute('max'), '100');
  await dlg.getByLabel('Name').fill('pump-1');
  await dlg.getByLabel('Only these:').check();
  await dlg.getByLabel('Device ids, separated by commas or spaces').fill('pump-1');
  // ...and what the server refuses is shown as its exceeds_parent detail.
  await dlg.getByLabel('Per second').fill('500');
  await dlg.getByLabel('Burst').fill('1000');
  await dlg.getByRole('button', { name: 'Mint' }).click();
  await dlg.getByRole('alert').getByText("exceeds_parent: the child's rate limit cannot exceed the parent's").waitFor();
  await shot(page, '03-mint-refused');
  await dlg.getByLabel('Per second').fill('10');
  await dlg.getByLabel('Burst').fill('20');
  await dlg.getByRole('button', { name: 'Mint' }).click();
  const childSecret = await takeSecret(page);
  const childId = await tokenId(page, 'pump-1');
  // The child hangs under its parent in the tree.
  await page.locator(`li[data-token-id="${gatewayId}"] li[data-token-id="${childId}"]`).waitFor();
  const child = await (await fetch(`${base}/applications/farm/tokens/${childId}`, { headers: { Authorization: `Bearer ${ADMIN}` } })).json();
  assert.equal(child.parentId, gatewayId);
  assert.deepEqual(child.devices, ['pump-1']);
  assert.deepEqual(child.rateLimit, { perSecond: 10, burst: 20 });

  // The child works on the device listener.
  let r = await postState(server, childSecret, 'farm', 'pump-1', { data: { flow: 1 } });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  await shot(page, '04-token-tree');

  // Deactivating the parent in the console: the count is shown first.
  await card(page, 'gateway').getByRole('button', { name: 'Deactivate' }).click();
  dlg = page.getByRole('dialog', { name: 'Deactivate branch' });
  await dlg.getByText('its 1 descendant stop working at once').waitFor();
  await dlg.getByText('2 tokens currently usable will be refused').waitFor();
  await shot(page, '05-confirm-deactivate');
  await dlg.getByRole('button', { name: 'Deactivate' }).click();
  await card(page, 'gateway').locator('.badge.inactive').waitFor();
  await card(page, 'pump-1').getByText('blocked: gateway is inactive').waitFor();
  r = await postState(server, childSecret, 'farm', 'pump-1', { data: { flow: 2 } });
  assert.equal(r.status, 401, 'the child is refused once its parent is inactive');
  await shot(page, '06-branch-inactive');

  // Re-activating restores the branch.
  await card(page, 'gateway').getByRole('button', { name: 'Re-activate' }).click();
  dlg = page.getByRole('dialog', { name: 'Re-activate branch' });
  await dlg.getByText('2 tokens').waitFor();
  await dlg.getByRole('button', { name: 'Re-activate' }).click();
  await card(page, 'pump-1').locator('.badge.active').waitFor();
  r = await postState(server, childSecret, 'farm', 'pump-1', { data: { flow: 3 } });
  assert.equal(r.status, 200);

  // Some history for the chart: readings every two minutes or so over the last hour.
  const now = Date.now();
  const states = Array.from({ length: 30 }, (_, i) => ({ time: now - (30 - i) * 115e3, data: { flow: 10 + 4 * Math.sin(i / 3) + (i % 4), on: true } }));
  r = await postState(server, gatewaySecret, 'farm', 'pump-1', states);
  assert.equal(r.status, 200, JSON.stringify(r.body));

  // Devices, reached with the keyboard: focus lands on the view's heading.
  await page.getByRole('navigation', { name: 'Views' }).getByRole('button', { name: 'Devices' }).focus();
  await page.keyboard.press('Enter');
  await page.waitForFunction(() => document.activeElement?.textContent === 'Devices');
  // pump-1 is listed by the devices API: it has stored 32 states.
  const row = page.getByRole('row').filter({ has: page.getByRole('rowheader', { name: 'pump-1' }) });
  await row.getByText('ago').waitFor();
  assert.equal((await row.getByRole('cell').nth(2).textContent()).trim(), '32');
  await page.getByText('1 device shown.').waitFor();
  await shot(page, '07-devices');
  await row.getByRole('button', { name: 'Open pump-1' }).click();

  // Its composite state and a chart of `flow` over the last hour.
  await page.getByRole('rowheader', { name: 'flow' }).waitFor();
  const chart = page.locator('svg.chart');
  await chart.waitFor();
  const drawn = Number(await page.locator('[data-points]').getAttribute('data-points'));
  assert.equal(drawn, 32, 'every flow value of the last hour is charted (flow 1, flow 3 and the array of 30)');
  assert.ok((await chart.locator('path.series').getAttribute('d')).startsWith('M'));
  await page.getByText('Watching for new states').waitFor();

  // A live state arrives without reloading.
  r = await postState(server, childSecret, 'farm', 'pump-1', { data: { flow: 42.5, marker: 'live-1' } });
  assert.equal(r.status, 200);
  await page.locator('ol.live li', { hasText: 'live-1' }).waitFor();
  await page.locator('[data-points="33"]').waitFor();
  await page.getByRole('row', { name: /marker/ }).waitFor();
  // Two states with the same time, sent apart: each shows once, however
  // many polls see that time again.
  const t = Date.now();
  for (const marker of ['same-a', 'same-b']) {
    assert.equal((await postState(server, childSecret, 'farm', 'pump-1', { time: t, data: { flow: 41, marker } })).status, 200);
    await page.locator('ol.live li', { hasText: marker }).waitFor();
  }
  await page.waitForTimeout(3500);
  assert.equal(await page.locator('ol.live li', { hasText: 'same-a' }).count(), 1);
  assert.equal(await page.locator('ol.live li', { hasText: 'same-b' }).count(), 1);
  assert.equal(await page.locator('ol.live li').count(), 3);
  await shot(page, '08-device');

  // Broker figures from /metrics, including the refusal seen above.
  await page.getByRole('navigation', { name: 'Views' }).getByRole('button', { name: 'Broker' }).click();
  await page.getByRole('heading', { name: 'Refusals by reason' }).waitFor();
  await page.getByRole('cell', { name: '401 unauthorized' }).waitFor();
  const stored = await page.locator('.stat', { hasText: 'Stored since start' }).locator('.value').textContent();
  // flow 1 and 3, the 30-state array and the three live ones; flow 2 was refused.
  assert.equal(stored.trim(), '35');
  // While devices send, the live ingest rate and commit latency show it.
  const ingest = page.locator('.stat', { hasText: 'Ingest' }).locator('.value');
  const latency = page.locator('.stat', { hasText: 'Group-commit latency' }).locator('.value');
  const ack = page.locator('.stat', { hasText: 'Ack latency' }).locator('.value');
  // The root token also sees that this broker runs alone.
  await page.getByText('Standalone broker (no cluster).').waitFor();
  let seen = false;
  for (let i = 0; i < 60 && !seen; i += 1) {
    const batch = Array.from({ length: 20 }, (_, k) => ({ data: { flow: 20 + k } }));
    assert.equal((await postState(server, gatewaySecret, 'farm', 'pump-2', batch)).status, 200);
    await page.waitForTimeout(100);
    seen = /^[1-9]/.test((await ingest.textContent()).trim()) && /p50 [0-9]/.test(await latency.textContent())
      && /p50 [0-9].* p99 [0-9]/.test(await ack.textContent());
  }
  assert.ok(seen, `no live ingest rate shown: ${await ingest.textContent()} / ${await latency.textContent()} / ${await ack.textContent()}`);
  await shot(page, '09-broker');

  // A phone-sized viewport: the tree and the device view fit the width.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.getByRole('navigation', { name: 'Views' }).getByRole('button', { name: 'Tokens' }).click();
  await card(page, 'pump-1').waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the page scrolls sideways by ${overflow}px on a phone`);
  await shot(page, '10-phone-tokens');
  await page.setViewportSize({ width: 1280, height: 800 });

  // Deleting the branch: the count first, then both are gone for good.
  await card(page, 'gateway').getByRole('button', { name: 'Delete' }).click();
  dlg = page.getByRole('dialog', { name: 'Delete branch' });
  await dlg.getByText('Delete “gateway” and its 1 descendant? 2 tokens will be gone for good').waitFor();
  await dlg.getByRole('button', { name: 'Delete' }).click();
  await card(page, 'gateway').waitFor({ state: 'detached' });
  assert.equal(await card(page, 'pump-1').count(), 0);
  await page.getByText('This application has no tokens yet').waitFor();
  r = await postState(server, childSecret, 'farm', 'pump-1', { data: { flow: 4 } });
  assert.equal(r.status, 401, 'a deleted branch is refused');

  await assertNoSecretKept(chrome, page, [ADMIN, gatewaySecret, childSecret]);

  // Signing out forgets the token: the views are gone.
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByRole('heading', { name: 'Sign in' }).waitFor();
  assert.equal(await page.locator('#view').innerHTML(), '');

  // Nothing left this origin: no CDN, no fonts, no other host.
  const origin = new URL(base).origin;
  for (const u of chrome.requests) assert.ok(u.startsWith(`${origin}/`), `request to another origin: ${u}`);
  // No script error and no CSP refusal; the only failed loads are the
  // refused sign-in (401) and the refused mint (403) above.
  const errors = pageErrors(chrome);
  const unexpected = errors.filter((l) => !/Failed to load resource: .* (401|403) /.test(l));
  assert.deepEqual(unexpected, [], `errors in the page: ${unexpected.join('\n')}`);
});

test('an application token sees its own branch and nothing wider', async () => {
  const base = server.admin;
  const mint = async (caller, body) => {
    const res = await fetch(`${base}/applications/orchard/tokens`, {
      method: 'POST', headers: { Authorization: `Bearer ${caller}`, 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    });
    assert.equal(res.status, 201);
    return res.json();
  };
  const backend = await mint(ADMIN, { name: 'backend', scope: ['device.sendState', 'device.getState', 'token.create', 'token.read', 'token.revoke'], devices: ['tree-1', 'tree-2'] });
  const sibling = await mint(ADMIN, { name: 'sibling', scope: ['device.sendState'] });
  const sensor = await mint(backend.token, { name: 'sensor', scope: ['device.sendState'], devices: ['tree-1'] });

  const page = await chrome.context.newPage();
  await page.goto(`${base}/console/`);

  // The root mints under a token this tab never saw the secret of: the
  // form asks for it, because a token mints its own children.
  await page.getByLabel('Token', { exact: true }).fill(ADMIN);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByLabel('Application id').fill('orchard');
  await page.getByRole('button', { name: 'Open' }).click();
  await card(page, 'backend').getByRole('button', { name: 'Mint child' }).click();
  let dlg = page.getByRole('dialog', { name: 'Mint a child of backend' });
  await dlg.getByLabel('Name').fill('camera');
  await dlg.getByLabel('Secret of backend').fill('sl_wrong');
  await dlg.getByRole('button', { name: 'Mint' }).click();
  await dlg.getByText('That secret is not accepted for this token.').waitFor();
  await dlg.getByLabel('Secret of backend').fill(backend.token);
  await dlg.getByRole('button', { name: 'Mint' }).click();
  const cameraSecret = await takeSecret(page);
  const cameraId = await tokenId(page, 'camera');
  await page.locator(`li[data-token-id="${backend.id}"] li[data-token-id="${cameraId}"]`).waitFor();
  const camera = await (await fetch(`${base}/applications/orchard/tokens/${cameraId}`, { headers: { Authorization: `Bearer ${ADMIN}` } })).json();
  assert.equal(camera.parentId, backend.id);
  assert.deepEqual(camera.devices, ['tree-1', 'tree-2'], 'devices left as offered are the parent\'s');
  await page.getByRole('button', { name: 'Sign out' }).click();

  await page.getByLabel('Token', { exact: true }).fill(backend.token);
  await page.getByRole('button', { name: 'Sign in' }).click();
  // No application picker: the token's own record names its application.
  await page.getByText('Application orchard').waitFor();
  await card(page, 'backend').getByText('you').waitFor();
  await card(page, 'sensor').waitFor();
  await card(page, 'camera').waitFor();
  assert.equal(await card(page, 'sibling').count(), 0, 'a token outside its branch is not shown');
  assert.equal(await page.getByRole('button', { name: 'change' }).isVisible(), false);
  // It may not deactivate itself, only what it minted.
  assert.equal(await card(page, 'backend').getByRole('button', { name: 'Deactivate' }).count(), 0);
  await card(page, 'sensor').getByRole('button', { name: 'Deactivate' }).waitFor();
  // Its mint form offers its own devices only.
  await card(page, 'backend').getByRole('button', { name: 'Mint child' }).click();
  dlg = page.getByRole('dialog', { name: 'Mint a child of backend' });
  assert.equal(await dlg.getByLabel('Secret of backend').count(), 0, 'the signed-in token mints as itself');
  const devices = await dlg.locator('input[name=device]').evaluateAll((els) => els.map((e) => e.value));
  assert.deepEqual(devices, ['tree-1', 'tree-2']);
  await dlg.getByRole('button', { name: 'Cancel' }).click();
  await shot(page, '11-app-token');

  // When its own token is deactivated, the console signs it out.
  const res = await fetch(`${base}/applications/orchard/tokens/${backend.id}`, {
    method: 'PATCH', headers: { Authorization: `Bearer ${ADMIN}`, 'Content-Type': 'application/json' }, body: JSON.stringify({ status: 'inactive' }),
  });
  assert.equal(res.status, 200);
  await page.getByRole('button', { name: 'Refresh' }).click();
  await page.getByText('Your token is no longer accepted').waitFor();
  await page.getByRole('heading', { name: 'Sign in' }).waitFor();
  await assertNoSecretKept(chrome, page, [ADMIN, backend.token, sensor.token, sibling.token, cameraSecret]);
  await page.close();
});

test('the devices view pages through the devices API; an application token sees no cluster', async () => {
  const base = server.admin;
  const res = await fetch(`${base}/applications/fleet/tokens`, {
    method: 'POST', headers: { Authorization: `Bearer ${ADMIN}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ name: 'ops', scope: ['device.sendState', 'device.getState', 'token.read'] }),
  });
  assert.equal(res.status, 201);
  const ops = await res.json();
  // 105 devices: more than one page of 100.
  const ids = Array.from({ length: 105 }, (_, i) => `unit-${String(i).padStart(3, '0')}`);
  for (let i = 0; i < ids.length; i += 15) {
    const sent = await Promise.all(ids.slice(i, i + 15).map((d, k) => postState(server, ops.token, 'fleet', d, Array.from({ length: 1 + (k % 3) }, () => ({ data: { v: k } })))));
    for (const r of sent) assert.equal(r.status, 200, JSON.stringify(r.body));
  }

  const page = await chrome.context.newPage();
  await page.goto(`${base}/console/`);
  await page.getByLabel('Token', { exact: true }).fill(ops.token);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByText('Application fleet').waitFor();
  await page.getByRole('navigation', { name: 'Views' }).getByRole('button', { name: 'Devices' }).click();
  await page.getByText('100 devices shown; more follow.').waitFor();
  const rows = page.locator('table.devices tbody tr');
  assert.equal(await rows.count(), 100);
  assert.equal((await rows.first().getByRole('rowheader').textContent()).trim(), 'unit-000');
  await shot(page, '12-devices-paged');
  await page.getByRole('button', { name: 'Show more devices' }).click();
  await page.getByText('105 devices shown.').waitFor();
  assert.equal(await rows.count(), 105);
  assert.equal(await page.getByRole('button', { name: 'Show more devices' }).isVisible(), false);
  // Each row says how many states its device stored.
  const last = rows.filter({ has: page.getByRole('rowheader', { name: 'unit-104' }) });
  assert.equal((await last.getByRole('cell').nth(2).textContent()).trim(), String(1 + ((104 % 15) % 3)));

  // The broker view of an application token shows the figures but not
  // the cluster, which only the root token may read.
  await page.getByRole('navigation', { name: 'Views' }).getByRole('button', { name: 'Broker' }).click();
  await page.locator('.stat', { hasText: 'Ack latency' }).waitFor();
  await page.getByRole('heading', { name: 'Refusals by reason' }).waitFor();
  assert.equal(await page.getByText('Standalone broker').count(), 0);
  assert.equal(await page.getByRole('heading', { name: 'Cluster' }).count(), 0);
  await page.close();
});
