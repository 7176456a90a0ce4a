// The console's pure modules, run in Node: the token-tree reasoning that
// predicts derived status and the reach of an action, the Prometheus
// parser and the figures drawn from it, the chart's scales, and the
// reading of live-stream events.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { buildTree, derived, descendants, grantable, impact, mayManage } from '../../src/console/tree.js';
import { parsePrometheus, quantileBetween, summarize, total } from '../../src/console/metrics.js';
import { downsample, niceTicks, timeTicks } from '../../src/console/chart.js';
import { clusterView } from '../../src/console/cluster.js';
import { parseEvent } from '../../src/console/api.js';

const NOW = Date.parse('2026-06-01T00:00:00Z');
let seq = 0;
function rec(id, parentId, extra = {}) {
  seq += 1;
  return {
    id, parentId, name: id, applicationId: 'app', scope: ['device.sendState'], devices: ['*'],
    expirationDate: null, status: 'active', rateLimit: null,
    createdAt: new Date(NOW - 1e6 + seq).toISOString(), lastUsedAt: null, ...extra,
  };
}

// root ─ a ─ b ─ c
//        └ d (inactive) ─ e
//   f (expired)
function sample() {
  return [
    rec('a', null, { scope: ['all.Application'] }),
    rec('b', 'a', { scope: ['device.sendState', 'token.create'], devices: ['d1', 'd2'], expirationDate: '2026-07-01T00:00:00Z', rateLimit: { perSecond: 5, burst: 9 } }),
    rec('c', 'b', { expirationDate: '2026-06-15T00:00:00Z' }),
    rec('d', 'a', { status: 'inactive' }),
    rec('e', 'd', { devices: ['d3'] }),
    rec('f', null, { expirationDate: '2026-05-01T00:00:00Z' }),
  ];
}

test('the tree hangs children under parents, top-level tokens under the root', () => {
  const { top, byId } = buildTree(sample(), null);
  assert.ok(top.root);
  assert.deepEqual(top.children.map((n) => n.id), ['a', 'f']);
  assert.deepEqual(byId.get('a').children.map((n) => n.id), ['b', 'd']);
  assert.deepEqual(descendants(byId.get('a')).map((n) => n.id), ['b', 'c', 'd', 'e']);
});

test('an application token is the top of its own tree', () => {
  const records = sample();
  const self = records[0];
  const { top } = buildTree(records.filter((r) => r.id !== 'a' && r.id !== 'f'), self);
  assert.equal(top.id, 'a');
  assert.deepEqual(top.children.map((n) => n.id), ['b', 'd']);
});

test('derived status follows the chain as the server does', () => {
  const { byId } = buildTree(sample(), null);
  const st = (id) => derived(byId.get(id), NOW);
  assert.deepEqual([st('a').state, st('b').state, st('c').state], ['active', 'active', 'active']);
  assert.equal(st('d').state, 'inactive');
  assert.equal(st('e').state, 'blocked');
  assert.equal(st('e').cause.id, 'd');
  assert.equal(st('f').state, 'expired');
  // After b's expiry its child c is blocked by it, though c expires later.
  const later = Date.parse('2026-07-02T00:00:00Z');
  assert.equal(derived(byId.get('b'), later).state, 'expired');
  assert.equal(derived(byId.get('c'), later).state, 'expired');
});

test('impact counts what an action changes', () => {
  const { byId } = buildTree(sample(), null);
  // Deactivating a: a, b, c stop; d and e were already unusable.
  assert.deepEqual(impact(byId.get('a'), 'deactivate', NOW), { changed: 3, descendants: 4 });
  // Re-activating d brings back d and e.
  assert.deepEqual(impact(byId.get('d'), 'activate', NOW), { changed: 2, descendants: 1 });
  // Deleting removes the whole subtree, usable or not.
  assert.deepEqual(impact(byId.get('a'), 'delete', NOW), { changed: 5, descendants: 4 });
  // Re-activating under an inactive ancestor changes nothing usable.
  const recs = sample().map((r) => (r.id === 'e' ? { ...r, status: 'inactive' } : r));
  const t = buildTree(recs, null);
  assert.deepEqual(impact(t.byId.get('e'), 'activate', NOW), { changed: 0, descendants: 0 });
});

test('a node offers what it may grant, bounded by its chain', () => {
  const { top, byId } = buildTree(sample(), null);
  assert.deepEqual(grantable(top).devices, ['*']);
  assert.equal(grantable(byId.get('a')).scopes.length, 6);
  const b = grantable(byId.get('b'));
  assert.deepEqual(b.scopes, ['device.sendState', 'token.create']);
  assert.deepEqual(b.devices, ['d1', 'd2']);
  assert.equal(b.maxExpiry, Date.parse('2026-07-01T00:00:00Z'));
  assert.deepEqual(b.rateLimit, { perSecond: 5, burst: 9 });
  assert.equal(grantable(byId.get('c')).maxExpiry, Date.parse('2026-06-15T00:00:00Z'));
});

test('only the root or an ancestor holding the scope may manage a token', () => {
  const records = sample();
  const { top, byId } = buildTree(records, null);
  assert.equal(mayManage({ root: true }, top, 'token.revoke'), false);
  assert.equal(mayManage({ root: true }, byId.get('b'), 'token.revoke'), true);
  const self = { root: false, token: records[1] };
  assert.equal(mayManage(self, byId.get('b'), 'token.revoke'), false, 'not itself');
  assert.equal(mayManage(self, byId.get('c'), 'token.revoke'), false, 'b lacks token.revoke');
  const admin = { root: false, token: records[0] };
  assert.equal(mayManage(admin, byId.get('c'), 'token.revoke'), true, 'all.Application implies it');
});

const SCRAPE_1 = `# HELP sluice_messages_stored State messages committed to storage.
# TYPE sluice_messages_stored counter
sluice_messages_stored_total 100
sluice_batches_committed_total 10
sluice_http_requests_total{status="200"} 90
sluice_http_requests_total{status="401"} 2
sluice_mqtt_connects_total{outcome="accepted"} 5
sluice_mqtt_connects_total{outcome="not_authorized"} 1
sluice_mqtt_publishes_total{qos="0",outcome="bad_payload"} 1
sluice_mqtt_publishes_total{qos="1",outcome="bad_payload"} 2
sluice_rate_limited_total{token="ab\\"c"} 3
sluice_mqtt_connections 4
sluice_commit_duration_seconds_bucket{le="0.001"} 5
sluice_commit_duration_seconds_bucket{le="0.002"} 8
sluice_commit_duration_seconds_bucket{le="+Inf"} 10
sluice_commit_duration_seconds_count 10
# EOF
`;
const SCRAPE_2 = SCRAPE_1
  .replace('sluice_messages_stored_total 100', 'sluice_messages_stored_total 300')
  .replace('sluice_batches_committed_total 10', 'sluice_batches_committed_total 20')
  .replace('sluice_http_requests_total{status="401"} 2', 'sluice_http_requests_total{status="401"} 6')
  .replace('le="0.001"} 5', 'le="0.001"} 5')
  .replace('le="0.002"} 8', 'le="0.002"} 18')
  .replace('le="+Inf"} 10', 'le="+Inf"} 20');

test('Prometheus text is parsed with labels, escapes and +Inf', () => {
  const m = parsePrometheus(SCRAPE_1);
  assert.equal(total(m, 'sluice_messages_stored_total'), 100);
  assert.equal(m.get('sluice_rate_limited_total')[0].labels.token, 'ab"c');
  assert.equal(total(m, 'sluice_mqtt_publishes_total', (l) => l.outcome === 'bad_payload'), 3);
  assert.equal(m.get('sluice_commit_duration_seconds_bucket')[2].labels.le, '+Inf');
  assert.ok(!m.has('EOF'));
});

test('rates, quantiles and refusals come from the difference of two scrapes', () => {
  const a = parsePrometheus(SCRAPE_1);
  const b = parsePrometheus(SCRAPE_2);
  const s = summarize(a, b, 2);
  assert.equal(s.ingestRate, 100);
  assert.equal(s.batchRate, 5);
  assert.equal(s.meanBatch, 20);
  assert.equal(s.mqttConnections, 4);
  // All 10 commits of the interval fell in (0.001, 0.002]: p50 is halfway.
  assert.equal(quantileBetween(a, b, 'sluice_commit_duration_seconds', 0.5), 0.0015);
  assert.equal(quantileBetween(a, a, 'sluice_commit_duration_seconds', 0.5), null);
  const r = Object.fromEntries(s.refusals.map((x) => [x.key, x]));
  assert.equal(r['http:401'].total, 6);
  assert.equal(r['http:401'].rate, 2);
  assert.equal(r['sluice_mqtt_connects_total:not_authorized'].total, 1);
  assert.equal(r['sluice_mqtt_publishes_total:bad_payload'].total, 3);
  assert.equal(r.rate_limited.total, 3);
  assert.ok(!('http:200' in r) && !('sluice_mqtt_connects_total:accepted' in r));
});

test('chart scales pick round ticks and keep the shape when downsampling', () => {
  assert.deepEqual(niceTicks(0, 10, 5), [0, 2, 4, 6, 8, 10]);
  assert.deepEqual(niceTicks(0.1, 0.35, 5), [0.1, 0.15, 0.2, 0.25, 0.3, 0.35]);
  assert.deepEqual(niceTicks(3, 3), [3]);
  const hour = 3600e3;
  const t = timeTicks(Date.parse('2026-06-01T10:07:00Z'), Date.parse('2026-06-01T11:07:00Z'), 6);
  assert.ok(t.length >= 2 && t.length <= 7, String(t.length));
  assert.ok(t.every((x) => x % (15 * 60e3) === 0));
  assert.ok(t[t.length - 1] - t[0] < hour);
  const pts = Array.from({ length: 10000 }, (_, i) => [i, i === 5000 ? 1000 : Math.sin(i / 100)]);
  const d = downsample(pts, 100);
  assert.ok(d.length <= 200);
  assert.ok(d.some((p) => p[1] === 1000), 'a spike survives downsampling');
  assert.ok(d.every((p, i) => i === 0 || p[0] >= d[i - 1][0]), 'in time order');
});

test('the cluster view puts this broker first and measures lag from the newest revision', () => {
  assert.deepEqual(clusterView({ mode: 'standalone' }), { mode: 'standalone' });
  const v = clusterView({
    mode: 'cluster', nodeId: 'b', applied: 40, pendingChanges: 2, lastAppliedAt: null, stale: false,
    nodes: [
      { nodeId: 'c', applied: 42, lastHeartbeat: '2026-06-01T00:00:00.000Z', stale: false },
      { nodeId: 'a', applied: 30, lastHeartbeat: '2026-05-31T23:59:00.000Z', stale: true },
      { nodeId: 'b', applied: 41, lastHeartbeat: '2026-06-01T00:00:01.000Z', stale: false },
    ],
  });
  assert.equal(v.newest, 42);
  assert.equal(v.pending, 2);
  assert.deepEqual(v.nodes.map((n) => [n.nodeId, n.applied, n.lag, n.self, n.stale]), [
    ['b', 40, 2, true, false],
    ['a', 30, 12, false, true],
    ['c', 42, 0, false, false],
  ]);
  assert.equal(v.nodes[0].lastHeartbeat, '2026-06-01T00:00:01.000Z');
});

test('ack latency quantiles come from their own histogram', () => {
  const scrape = (n) => parsePrometheus([
    `sluice_ack_latency_seconds_bucket{le="0.001"} ${n}`,
    `sluice_ack_latency_seconds_bucket{le="0.002"} ${2 * n}`,
    `sluice_ack_latency_seconds_bucket{le="+Inf"} ${2 * n}`,
  ].join('\n'));
  const sum = summarize(scrape(0), scrape(10), 2);
  assert.ok(sum.ackP50 > 0 && sum.ackP50 <= 0.001, String(sum.ackP50));
  assert.ok(sum.ackP99 > 0.001 && sum.ackP99 <= 0.002, String(sum.ackP99));
  assert.equal(sum.commitP99, null);
});

test('live-stream events are read as Server-Sent Events define them', () => {
  assert.deepEqual(parseEvent('id: 42\ndata: {"device":"d","time":1,"data":{"x":1}}'),
    { id: '42', event: 'message', data: '{"device":"d","time":1,"data":{"x":1}}' });
  assert.deepEqual(parseEvent('event: aged_out\ndata: {"detail":"gone"}'),
    { id: null, event: 'aged_out', data: '{"detail":"gone"}' });
  // Comments (heartbeats) are no events; data lines are joined.
  assert.equal(parseEvent(': heartbeat'), null);
  assert.equal(parseEvent('data:a\ndata: b').data, 'a\nb');
});
