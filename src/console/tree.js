// The token tree as the console reasons about it: pure functions over the
// records of the admin API, so they run (and are tested) without a page.
// The server stays the authority; this only predicts what it will do, to
// show derived status and how many tokens an action touches.

export const SCOPES = [
  'all.Application',
  'device.sendState',
  'device.getState',
  'token.create',
  'token.read',
  'token.revoke',
];

/** Whether a scope list permits an action needing `scope`. */
export function allows(scopes, scope) {
  return scopes.includes(scope) || scopes.includes('all.Application');
}

/** Scopes a token holding `scopes` may give a child. */
export function grantableScopes(scopes) {
  return scopes.includes('all.Application') ? SCOPES.slice() : SCOPES.filter((s) => scopes.includes(s));
}

const ms = (t) => (t === null || t === undefined ? null : Date.parse(t));

/**
 * Builds the tree. `records` are token records (GET …/tokens); `self` is the
 * signed-in token's record, or null for the root admin token, which is then
 * a pseudo-node above the application's top-level tokens.
 */
export function buildTree(records, self) {
  const byId = new Map();
  const node = (record) => ({ id: record.id, record, parent: null, children: [] });
  for (const r of records) byId.set(r.id, node(r));
  if (self && !byId.has(self.id)) byId.set(self.id, node(self));
  const top = self ? byId.get(self.id) : { id: null, record: null, root: true, parent: null, children: [] };
  for (const n of byId.values()) {
    if (n === top) continue;
    const p = n.record.parentId && byId.get(n.record.parentId);
    // A token whose parent is not visible hangs under the top: for the
    // root that is every top-level token; for an application token the
    // list holds only its descendants, whose chains all reach it.
    const parent = p || top;
    n.parent = parent;
    parent.children.push(n);
  }
  const order = (a, b) => a.record.createdAt.localeCompare(b.record.createdAt) || a.id.localeCompare(b.id);
  for (const n of [top, ...byId.values()]) n.children.sort(order);
  return { top, byId };
}

/** The token's own state, ignoring its ancestors. */
export function ownState(record, now) {
  if (record.status !== 'active') return 'inactive';
  const exp = ms(record.expirationDate);
  if (exp !== null && now >= exp) return 'expired';
  return 'active';
}

/**
 * Derived state, as the server decides usability: a token is usable only
 * while it and every ancestor are active and unexpired. Returns
 * `{usable, state, cause}`: state is the own state when that is not active,
 * otherwise `blocked` with the nearest ancestor that is not usable as cause.
 */
export function derived(node, now, statusOf = (n) => n.record.status) {
  if (node.root) return { usable: true, state: 'active', cause: null };
  const own = ownState({ ...node.record, status: statusOf(node) }, now);
  if (own !== 'active') return { usable: false, state: own, cause: node };
  for (let a = node.parent; a && !a.root; a = a.parent) {
    if (ownState({ ...a.record, status: statusOf(a) }, now) !== 'active') {
      return { usable: false, state: 'blocked', cause: a };
    }
  }
  return { usable: true, state: 'active', cause: null };
}

/** Every descendant, parents before children. */
export function descendants(node) {
  const out = [];
  const stack = [...node.children].reverse();
  while (stack.length) {
    const n = stack.pop();
    out.push(n);
    stack.push(...[...n.children].reverse());
  }
  return out;
}

/**
 * What an action on `node` does, before it is confirmed:
 * - `deactivate`: the tokens (itself and descendants) that stop working;
 * - `activate`: those that start working again (descendants that are
 *   themselves inactive or expired stay so);
 * - `delete`: the whole subtree, gone for good.
 * Returns `{changed, descendants}` counts.
 */
export function impact(node, action, now) {
  const subtree = [node, ...descendants(node)];
  const all = subtree.length - 1;
  if (action === 'delete') return { changed: subtree.length, descendants: all };
  const to = action === 'deactivate' ? 'inactive' : 'active';
  const after = (n) => (n === node ? to : n.record.status);
  let changed = 0;
  for (const n of subtree) {
    if (derived(n, now).usable !== derived(n, now, after).usable) changed += 1;
  }
  return { changed, descendants: all };
}

/**
 * What a token may give a child (the attenuation rule): its scopes (all of
 * them under `all.Application`), its devices, an expiry no later than the
 * earliest one along its chain, and a rate limit no higher than its own.
 * `node` is a tree node; the root pseudo-node may grant anything.
 */
export function grantable(node) {
  if (node.root) return { scopes: SCOPES.slice(), devices: ['*'], maxExpiry: null, rateLimit: null };
  let maxExpiry = null;
  for (let a = node; a && !a.root; a = a.parent) {
    const e = ms(a.record.expirationDate);
    if (e !== null && (maxExpiry === null || e < maxExpiry)) maxExpiry = e;
  }
  return {
    scopes: grantableScopes(node.record.scope),
    devices: node.record.devices,
    maxExpiry,
    rateLimit: node.record.rateLimit,
  };
}

/** Whether the signed-in principal may act on `node` with `scope`: the
 * root on any token, an application token on its strict descendants. */
export function mayManage(principal, node, scope) {
  if (node.root) return false;
  if (principal.root) return true;
  if (node.id === principal.token.id) return false;
  return allows(principal.token.scope, scope);
}
