// What every browser test shares: Debian's Chromium driven by
// playwright-core in a throwaway profile, with every request and console
// line recorded; screenshots into artifacts/; the check that no secret was
// kept anywhere the browser persists; and the token-view steps more than
// one test takes.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = dirname(fileURLToPath(import.meta.url));
export const ARTIFACTS = join(HERE, 'artifacts');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = 15000;

/**
 * Headless Chromium in a fresh profile: `{context, requests, logs, close}`.
 * `requests` holds every URL any page requested, `logs` everything pages
 * logged, script errors as `pageerror: …`.
 */
export async function launch() {
  mkdirSync(ARTIFACTS, { recursive: true });
  const profile = mkdtempSync(join(tmpdir(), 'sluice-chromium-'));
  const requests = [];
  const logs = [];
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      viewport: { width: 1280, height: 800 },
      permissions: ['clipboard-read', 'clipboard-write'],
    });
  } catch (e) {
    rmSync(profile, { recursive: true, force: true });
    throw e;
  }
  context.setDefaultTimeout(TIMEOUT);
  context.on('request', (r) => requests.push(r.url()));
  context.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
  context.on('weberror', (e) => logs.push(`pageerror: ${e.error().message}`));
  return {
    context,
    requests,
    logs,
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

export async function shot(page, name) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/**
 * Asserts that none of `secrets` is in the page's URL, web storage or
 * cookies, nor in anything the browser logged, and that the console
 * stored nothing at all.
 */
export async function assertNoSecretKept(browser, page, secrets) {
  const url = page.url();
  const stored = await page.evaluate(() => {
    const dump = (s) => Array.from({ length: s.length }, (_, i) => `${s.key(i)}=${s.getItem(s.key(i))}`).join('\n');
    return { local: dump(localStorage), session: dump(sessionStorage), cookie: document.cookie };
  });
  const cookies = JSON.stringify(await browser.context.cookies());
  for (const secret of secrets) {
    assert.ok(!url.includes(secret), `secret in the URL ${url}`);
    assert.ok(!stored.local.includes(secret), 'secret in localStorage');
    assert.ok(!stored.session.includes(secret), 'secret in sessionStorage');
    assert.ok(!stored.cookie.includes(secret) && !cookies.includes(secret), 'secret in cookies');
    for (const line of browser.logs) assert.ok(!line.includes(secret), `secret in the browser console: ${line}`);
  }
  assert.equal(stored.local, '', 'the console wrote to localStorage');
  assert.equal(stored.session, '', 'the console wrote to sessionStorage');
  assert.equal(stored.cookie, '', 'the console set a cookie');
}

/** A token's card in the tokens view. */
export function card(page, name) {
  return page.locator(`article[aria-label="Token ${name}"]`);
}

export async function tokenId(page, name) {
  return (await card(page, name).locator('dt:text-is("Id") + dd code').textContent()).trim();
}

/**
 * After "Mint" in a mint dialog: reads the secret the console shows once,
 * closes the dialog and returns the secret. With `shotName`, also takes a
 * screenshot and checks the copy button.
 */
export async function takeSecret(page, shotName) {
  const dlg = page.getByRole('dialog', { name: 'New token secret' });
  await dlg.waitFor();
  const secret = await dlg.locator('input.secret').inputValue();
  assert.match(secret, /^sl_[A-Za-z0-9_-]{43}$/);
  if (shotName) {
    await shot(page, shotName);
    // The copy button puts exactly the secret on the clipboard.
    await dlg.getByRole('button', { name: 'Copy' }).click();
    await dlg.getByText('Copied.').waitFor();
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), secret);
  }
  await dlg.getByRole('button', { name: 'Done' }).click();
  await dlg.waitFor({ state: 'detached' });
  return secret;
}

/** Signs in with `secret` through the form of a fresh page on `base`. */
export async function signIn(page, base, secret) {
  await page.goto(`${base}/console/`);
  await page.getByLabel('Token', { exact: true }).fill(secret);
  await page.getByRole('button', { name: 'Sign in' }).click();
}

/** The browser's lines that are script errors or failed loads. */
export function pageErrors(browser) {
  return browser.logs.filter((l) => l.startsWith('error') || l.startsWith('pageerror'));
}
