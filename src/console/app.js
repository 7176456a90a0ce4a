// The console's entry point: sign-in, the application picker, navigation.
// The signed-in secret goes from the password field straight into a
// Session (memory only) and the field is cleared; reloading the page or
// signing out forgets it.

import { Session, whoami } from './api.js';
import { BrokerView } from './broker.js';
import { DevicesView } from './devices.js';
import { h, fill } from './dom.js';
import { TokensView } from './tokens.js';
import { allows } from './tree.js';

const $ = (sel) => document.querySelector(sel);

const VIEWS = {
  tokens: { label: 'Tokens', make: (ctx) => new TokensView(ctx), may: () => true },
  devices: { label: 'Devices', make: (ctx) => new DevicesView(ctx), may: (p) => p.root || allows(p.token.scope, 'device.getState') },
  broker: { label: 'Broker', make: (ctx) => new BrokerView(ctx), may: () => true },
};

let ctx = null;
let current = null;

function flash(text, kind = 'error') {
  const b = $('#banner');
  b.className = `banner ${kind}`;
  b.textContent = text;
  b.hidden = !text;
}

function show(id) {
  for (const sec of ['#signin', '#picker', '#workspace']) $(sec).hidden = sec !== id;
}

function signOut(message) {
  if (current) current.unmount();
  current = null;
  if (ctx) ctx.session.forget();
  ctx = null;
  $('#who').hidden = true;
  fill($('#nav'));
  fill($('#view'));
  show('#signin');
  flash(message || '', 'info');
  $('#signin-token').focus();
}

async function signIn(ev) {
  ev.preventDefault();
  const input = $('#signin-token');
  const secret = input.value.trim();
  input.value = '';
  const err = $('#signin-error');
  err.textContent = '';
  if (!secret) {
    err.textContent = 'Paste a token.';
    return;
  }
  let me;
  try {
    me = await whoami(secret);
  } catch (e) {
    err.textContent = e.status === 401
      ? 'The broker does not accept this token (unknown, inactive or expired).'
      : `Sign-in failed: ${e.message}`;
    input.focus();
    return;
  }
  flash('');
  const session = new Session(secret, () => signOut('Your token is no longer accepted (deactivated, deleted or expired). Sign in again.'));
  ctx = { session, principal: me, app: null, flash };
  $('#who-label').textContent = me.root ? 'Root admin token' : `Token “${me.token.name}”`;
  $('#who').hidden = false;
  if (me.root) {
    show('#picker');
    $('#picker-app').focus();
  } else {
    openApp(me.token.applicationId);
  }
}

function pickApp(ev) {
  ev.preventDefault();
  const input = $('#picker-app');
  if (!input.checkValidity()) {
    input.reportValidity();
    return;
  }
  openApp(input.value);
}

function openApp(app) {
  ctx.app = app;
  const p = ctx.principal;
  $('#app-label').textContent = app;
  $('#change-app').hidden = !p.root;
  fill($('#nav'), Object.entries(VIEWS).filter(([, v]) => v.may(p)).map(([key, v]) =>
    h('button', { type: 'button', dataset: { view: key }, onclick: () => openView(key) }, v.label)));
  show('#workspace');
  openView('tokens');
}

async function openView(key) {
  if (current) current.unmount();
  for (const b of document.querySelectorAll('#nav button')) {
    if (b.dataset.view === key) b.setAttribute('aria-current', 'page');
    else b.removeAttribute('aria-current');
  }
  flash('');
  current = VIEWS[key].make(ctx);
  await current.mount($('#view'));
  focusHeading();
}

/** Moves keyboard focus to the new view's heading, so a screen reader
 * announces it and Tab continues from there. */
function focusHeading() {
  const h1 = $('#view h1');
  if (!h1) return;
  h1.tabIndex = -1;
  h1.focus({ preventScroll: true });
}

function changeApp() {
  if (current) current.unmount();
  current = null;
  fill($('#view'));
  show('#picker');
  $('#picker-app').focus();
}

$('#signin-form').addEventListener('submit', signIn);
$('#picker-form').addEventListener('submit', pickApp);
$('#sign-out').addEventListener('click', () => signOut('Signed out. The token was forgotten.'));
$('#change-app').addEventListener('click', changeApp);
signOut('');
