// The token tree view: every token of the application the signed-in token
// may see, parent → children, with derived status; minting under any node
// whose secret this tab holds; deactivating, re-activating and deleting
// branches with the number of tokens affected shown first.

import { appPath } from './api.js';
import { h, fill, modal, nextId, note, relative, timeEl, toLocalInput, toMs } from './dom.js';
import { allows, buildTree, derived, descendants, grantable, impact, mayManage } from './tree.js';

const STATE_TEXT = { active: 'active', inactive: 'inactive', expired: 'expired', blocked: 'blocked' };

export class TokensView {
  constructor(ctx) {
    this.ctx = ctx;
    this.collapsed = new Set();
    this.el = h('section', { class: 'view', 'aria-labelledby': 'tokens-h' });
  }

  mount(container) {
    container.append(this.el);
    return this.load();
  }

  unmount() {
    this.el.remove();
  }

  get principal() {
    return this.ctx.principal;
  }

  mayRead() {
    return this.principal.root || allows(this.principal.token.scope, 'token.read');
  }

  async load() {
    const { session, app } = this.ctx;
    fill(this.el, h('h1', { id: 'tokens-h' }, 'Tokens'), note('loading', 'Loading tokens…'));
    let records = [];
    try {
      if (this.mayRead()) records = await session.get(appPath(app, 'tokens'));
    } catch (e) {
      fill(this.el, h('h1', { id: 'tokens-h' }, 'Tokens'), note('error', `Could not list tokens: ${e.message}`));
      return;
    }
    this.records = records;
    this.tree = buildTree(records, this.principal.root ? null : this.principal.token);
    this.render();
  }

  render() {
    const now = Date.now();
    const { top } = this.tree;
    const intro = this.principal.root
      ? `Every token of application “${this.ctx.app}”. Top-level tokens were minted with the root admin token.`
      : this.mayRead()
        ? 'Your token and every token minted under it.'
        : 'Your token. It lacks token.read, so tokens minted under it earlier are not listed; those minted in this tab are.';
    const empty = top.children.length === 0 && top.root
      ? note('empty', 'This application has no tokens yet. Mint one from the root below.')
      : null;
    fill(this.el,
      h('div', { class: 'view-head' },
        h('h1', { id: 'tokens-h' }, 'Tokens'),
        h('button', { type: 'button', class: 'secondary', onclick: () => this.load() }, 'Refresh')),
      h('p', { class: 'muted' }, intro),
      empty,
      h('ul', { class: 'tree', role: 'list' }, this.renderNode(top, now)));
  }

  renderNode(node, now) {
    const d = derived(node, now);
    const kids = node.children;
    const open = !this.collapsed.has(node.id ?? 'root');
    const childList = kids.length && open
      ? h('ul', { class: 'tree', role: 'list' }, kids.map((k) => this.renderNode(k, now)))
      : null;
    return h('li', { class: ['node', d.usable ? '' : 'dead'], dataset: { tokenId: node.id ?? 'root' } },
      this.card(node, d, now),
      childList);
  }

  card(node, d, now) {
    const r = node.record;
    const kids = node.children.length;
    const toggle = kids
      ? h('button', {
        type: 'button',
        class: 'toggle',
        'aria-expanded': String(!this.collapsed.has(node.id ?? 'root')),
        'aria-label': `${this.collapsed.has(node.id ?? 'root') ? 'Show' : 'Hide'} ${kids} child token${kids > 1 ? 's' : ''}`,
        onclick: () => {
          const k = node.id ?? 'root';
          if (this.collapsed.has(k)) this.collapsed.delete(k); else this.collapsed.add(k);
          this.render();
        },
      }, this.collapsed.has(node.id ?? 'root') ? '▸' : '▾')
      : h('span', { class: 'toggle-space', 'aria-hidden': 'true' });
    if (node.root) {
      return h('article', { class: 'card root-card', 'aria-label': 'Root admin token' },
        h('header', {}, toggle, h('h2', {}, 'Root admin token'), h('span', { class: 'badge active' }, 'you')),
        h('p', { class: 'muted' }, 'May do everything in every application.'),
        h('div', { class: 'actions' }, this.mintButton(node, d)));
    }
    const you = !this.principal.root && node.id === this.principal.token.id;
    const badge = d.state === 'blocked'
      ? h('span', { class: 'badge blocked' }, `blocked: ${d.cause.record.name} is ${d.cause.record.status === 'active' ? 'expired' : 'inactive'}`)
      : h('span', { class: ['badge', d.state] }, STATE_TEXT[d.state]);
    const exp = toMs(r.expirationDate);
    const rl = r.rateLimit;
    return h('article', { class: 'card', 'aria-label': `Token ${r.name}` },
      h('header', {}, toggle, h('h2', {}, r.name), badge, you ? h('span', { class: 'badge you' }, 'you') : null),
      h('dl', { class: 'facts' },
        h('div', {}, h('dt', {}, 'Id'), h('dd', {}, h('code', {}, r.id))),
        h('div', {}, h('dt', {}, 'Scope'), h('dd', {}, r.scope.map((x) => h('span', { class: 'chip' }, x)))),
        h('div', {}, h('dt', {}, 'Devices'), h('dd', {}, r.devices[0] === '*' ? 'all devices' : r.devices.join(', '))),
        h('div', {}, h('dt', {}, 'Expires'), h('dd', {}, exp === null ? 'never' : [timeEl(exp), ` (${relative(exp, now)})`])),
        h('div', {}, h('dt', {}, 'Rate limit'), h('dd', {}, rl ? `${rl.perSecond}/s, burst ${rl.burst}` : 'none')),
        h('div', {}, h('dt', {}, 'Status'), h('dd', {}, r.status)),
        r.deactivatedBy ? h('div', {}, h('dt', {}, 'Deactivated by'), h('dd', {}, this.nameOf(r.deactivatedBy))) : null,
        h('div', {}, h('dt', {}, 'Last used'), h('dd', {}, r.lastUsedAt ? timeEl(r.lastUsedAt) : 'never')),
        node.children.length ? h('div', {}, h('dt', {}, 'Descendants'), h('dd', {}, String(descendants(node).length))) : null),
      h('div', { class: 'actions' },
        this.mintButton(node, d),
        mayManage(this.principal, node, 'token.revoke')
          ? [
            r.status === 'active'
              ? h('button', { type: 'button', class: 'warn', onclick: () => this.setStatus(node, 'inactive') }, 'Deactivate')
              : h('button', { type: 'button', onclick: () => this.setStatus(node, 'active') }, 'Re-activate'),
            h('button', { type: 'button', class: 'danger', onclick: () => this.remove(node) }, 'Delete'),
          ]
          : null));
  }

  /** `deactivatedBy` names a token id (or the root); show its name when known. */
  nameOf(v) {
    const id = typeof v === 'object' && v !== null ? v.id ?? JSON.stringify(v) : String(v);
    const n = this.tree.byId.get(id);
    return n ? `${n.record.name} (${id})` : id;
  }

  /** A node can mint when it is usable and holds token.create; the tab
   * must hold its secret or the operator pastes it in the form. */
  mintButton(node, d) {
    if (!d.usable) return null;
    if (!node.root && !allows(node.record.scope, 'token.create')) return null;
    const label = node.root ? 'Mint token' : 'Mint child';
    return h('button', { type: 'button', onclick: () => this.mint(node) }, label);
  }

  holds(node) {
    if (node.root) return true;
    if (!this.principal.root && node.id === this.principal.token.id) return true;
    return this.ctx.session.holds(node.id);
  }

  async mint(node) {
    const g = grantable(node);
    const id = (p) => nextId(`mint-${p}`);
    const nameId = id('name');
    const errId = id('err');
    const parentName = node.root ? 'the root admin token' : node.record.name;
    const scopeBoxes = g.scopes.map((sc) => {
      const i = id('scope');
      return h('div', { class: 'check' },
        h('input', { type: 'checkbox', id: i, name: 'scope', value: sc, checked: sc === 'device.sendState' }),
        h('label', { for: i }, sc));
    });
    let devicesField;
    if (g.devices[0] === '*') {
      const allId = id('dev-all');
      const onlyId = id('dev-only');
      const listId = id('dev-list');
      devicesField = h('fieldset', {},
        h('legend', {}, 'Devices'),
        h('div', { class: 'check' }, h('input', { type: 'radio', name: 'devmode', id: allId, value: 'all', checked: true }), h('label', { for: allId }, 'All devices')),
        h('div', { class: 'check' }, h('input', { type: 'radio', name: 'devmode', id: onlyId, value: 'only' }), h('label', { for: onlyId }, 'Only these:')),
        h('label', { for: listId, class: 'sr-only' }, 'Device ids, separated by commas or spaces'),
        h('input', { type: 'text', id: listId, name: 'devlist', placeholder: 'pump-1, pump-2', autocomplete: 'off', spellcheck: 'false' }));
    } else {
      devicesField = h('fieldset', {},
        h('legend', {}, `Devices (within ${parentName}’s)`),
        g.devices.map((dv) => {
          const i = id('dev');
          return h('div', { class: 'check' }, h('input', { type: 'checkbox', id: i, name: 'device', value: dv, checked: true }), h('label', { for: i }, dv));
        }));
    }
    const expId = id('exp');
    const rpsId = id('rps');
    const burstId = id('burst');
    const secretId = id('secret');
    const needSecret = !this.holds(node);
    const form = h('form', { class: 'mint', novalidate: true },
      h('p', { class: 'muted' }, `Minted by ${parentName}; it offers only what that token may grant, and the server checks it again.`),
      h('label', { for: nameId }, 'Name'),
      h('input', { id: nameId, name: 'name', required: true, maxlength: 255, autocomplete: 'off' }),
      h('fieldset', {}, h('legend', {}, 'Scope'), scopeBoxes),
      devicesField,
      h('label', { for: expId }, 'Expires'),
      h('input', { id: expId, name: 'expires', type: 'datetime-local', max: g.maxExpiry ? toLocalInput(g.maxExpiry) : undefined }),
      h('p', { class: 'hint' }, g.maxExpiry
        ? ['Latest allowed: ', timeEl(g.maxExpiry), '. Left empty, the child expires then too.']
        : 'Left empty, the token never expires.'),
      h('fieldset', {},
        h('legend', {}, 'Rate limit'),
        h('div', { class: 'row' },
          h('div', {}, h('label', { for: rpsId }, 'Per second'), h('input', { id: rpsId, name: 'rps', type: 'number', min: 1, max: g.rateLimit?.perSecond, inputmode: 'numeric' })),
          h('div', {}, h('label', { for: burstId }, 'Burst'), h('input', { id: burstId, name: 'burst', type: 'number', min: 1, max: g.rateLimit?.burst, inputmode: 'numeric' }))),
        h('p', { class: 'hint' }, g.rateLimit
          ? `At most ${g.rateLimit.perSecond}/s, burst ${g.rateLimit.burst}. Left empty, the child inherits that limit.`
          : 'Left empty, no limit.')),
      needSecret
        ? [h('label', { for: secretId }, `Secret of ${parentName}`),
          h('input', { id: secretId, name: 'secret', type: 'password', autocomplete: 'off', spellcheck: 'false', required: true }),
          h('p', { class: 'hint' }, 'A token mints its own children, so the server needs its secret. It is kept in this tab’s memory only.')]
        : null,
      h('p', { id: errId, class: 'error', role: 'alert' }),
      h('div', { class: 'actions' },
        h('button', { type: 'submit' }, 'Mint'),
        h('button', { type: 'button', class: 'secondary', value: 'cancel', onclick: () => dlg.close('cancel') }, 'Cancel')));
    const titleId = nextId('dlg');
    const dlg = h('dialog', { class: 'modal', 'aria-labelledby': titleId },
      h('h2', { id: titleId }, node.root ? 'Mint a token' : `Mint a child of ${parentName}`), form);
    dlg.addEventListener('close', () => dlg.remove());
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const err = form.querySelector(`#${errId}`);
      err.textContent = '';
      let body;
      try {
        body = mintBody(form, g);
      } catch (e) {
        err.textContent = e.message;
        return;
      }
      const submit = form.querySelector('button[type=submit]');
      submit.disabled = true;
      try {
        const path = appPath(this.ctx.app, 'tokens');
        const pasted = needSecret ? field(form, 'secret').value : undefined;
        if (needSecret) field(form, 'secret').value = '';
        const created = this.holdsAsSession(node)
          ? await this.ctx.session.call('POST', path, body)
          : await this.ctx.session.callAs(node.id, 'POST', path, body, pasted);
        const secret = created.token;
        delete created.token;
        this.ctx.session.remember(created.id, secret);
        dlg.close('done');
        await this.showSecret(created, secret);
        await this.load();
        this.focusCard(node);
      } catch (e) {
        err.textContent = e.status === 401 && needSecret
          ? 'That secret is not accepted for this token.'
          : e.detail ? `${e.code}: ${e.detail}` : e.code;
        submit.disabled = false;
      }
    });
    document.body.append(dlg);
    dlg.showModal();
    field(form, 'name').focus();
  }

  /** Whether minting under `node` is a call with the signed-in token. */
  holdsAsSession(node) {
    return node.root || (!this.principal.root && node.id === this.principal.token.id);
  }

  showSecret(created, secret) {
    const inputId = nextId('secret');
    const status = h('p', { class: 'hint', role: 'status' });
    const field = h('input', { id: inputId, type: 'text', readonly: true, value: secret, spellcheck: 'false', class: 'secret' });
    const copy = async () => {
      try {
        await navigator.clipboard.writeText(secret);
      } catch {
        field.select();
        document.execCommand('copy');
      }
      status.textContent = 'Copied.';
    };
    const content = h('div', {},
      h('p', {}, `Token “${created.name}” was minted. This is the only time its secret is shown: copy it now.`),
      h('label', { for: inputId }, 'Secret'),
      h('div', { class: 'row' }, field, h('button', { type: 'button', onclick: copy }, 'Copy')),
      status);
    return modal('New token secret', content, [{ label: 'Done', value: 'done' }], () => field.select());
  }

  async setStatus(node, to) {
    const now = Date.now();
    const action = to === 'inactive' ? 'deactivate' : 'activate';
    const { changed, descendants: all } = impact(node, action, now);
    const name = node.record.name;
    const text = action === 'deactivate'
      ? `Deactivate “${name}”? It and its ${all} descendant${all === 1 ? '' : 's'} stop working at once, on every listener: ${changed} token${changed === 1 ? '' : 's'} currently usable will be refused.`
      : `Re-activate “${name}”? ${changed} token${changed === 1 ? '' : 's'} (it and those of its ${all} descendant${all === 1 ? '' : 's'} that are themselves active) will work again.`;
    const ok = await modal(action === 'deactivate' ? 'Deactivate branch' : 'Re-activate branch',
      h('p', { class: 'impact' }, text),
      [{ label: action === 'deactivate' ? 'Deactivate' : 'Re-activate', value: 'ok', kind: action === 'deactivate' ? 'warn' : '' },
        { label: 'Cancel', value: 'cancel', kind: 'secondary' }]);
    if (!ok) return;
    await this.act(node, () => this.ctx.session.call('PATCH', appPath(this.ctx.app, 'tokens', node.id), { status: to }));
  }

  async remove(node) {
    const { changed, descendants: all } = impact(node, 'delete', Date.now());
    const ok = await modal('Delete branch',
      h('p', { class: 'impact' }, `Delete “${node.record.name}” and its ${all} descendant${all === 1 ? '' : 's'}? ${changed} token${changed === 1 ? '' : 's'} will be gone for good; this cannot be undone.`),
      [{ label: 'Delete', value: 'ok', kind: 'danger' }, { label: 'Cancel', value: 'cancel', kind: 'secondary' }]);
    if (!ok) return;
    await this.act(node.parent, () => this.ctx.session.call('DELETE', appPath(this.ctx.app, 'tokens', node.id)));
  }

  /** Runs a change, redraws the tree and puts keyboard focus back on
   * `focusNode`'s card (the redraw replaced the button that had it). */
  async act(focusNode, f) {
    try {
      await f();
    } catch (e) {
      this.ctx.flash(`The broker refused: ${e.message}`);
    }
    await this.load();
    this.focusCard(focusNode);
  }

  focusCard(node) {
    const key = node.id ?? 'root';
    const target = this.el.querySelector(`li[data-token-id="${key}"] > article .actions button`);
    if (target) target.focus();
  }
}

/** The POST body from the mint form; throws with a message for the form. */
export function mintBody(form, g) {
  const name = field(form, 'name').value.trim();
  if (!name) throw new Error('Give the token a name.');
  const scope = [...form.querySelectorAll('input[name=scope]:checked')].map((i) => i.value);
  if (!scope.length) throw new Error('Choose at least one scope.');
  const body = { name, scope };
  if (g.devices[0] === '*') {
    if (form.querySelector('input[name=devmode]:checked').value === 'only') {
      const list = field(form, 'devlist').value.split(/[\s,]+/).filter(Boolean);
      if (!list.length) throw new Error('List at least one device id, or choose all devices.');
      body.devices = list;
    }
  } else {
    const list = [...form.querySelectorAll('input[name=device]:checked')].map((i) => i.value);
    if (!list.length) throw new Error('Choose at least one device.');
    body.devices = list;
  }
  const expires = field(form, 'expires').value;
  if (expires) body.expirationDate = new Date(expires).toISOString();
  const rps = field(form, 'rps').value;
  const burst = field(form, 'burst').value;
  if (rps || burst) {
    if (!rps || !burst) throw new Error('Give both the rate per second and the burst, or neither.');
    body.rateLimit = { perSecond: Number(rps), burst: Number(burst) };
  }
  return body;
}

function field(form, name) {
  return form.querySelector(`[name="${name}"]`);
}
