// The broker view: live figures from `/metrics`, scraped every two seconds,
// and for the root token the cluster's brokers and their lag from
// `/cluster`, read in a loop of its own: while NATS is unreachable a
// `/cluster` answer can take the broker's NATS request timeout (10 s), and
// the figures must not wait for it.

import { metricsText } from './api.js';
import { sparkline } from './chart.js';
import { clusterView } from './cluster.js';
import { h, fill, note, relative, timeEl } from './dom.js';
import { parsePrometheus, summarize } from './metrics.js';

const INTERVAL_MS = 2000;
/** Samples kept for the sparklines (two minutes). */
const KEEP = 60;

function num(v, digits = 0) {
  if (v === null || v === undefined || Number.isNaN(v)) return '—';
  return v.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function ms(seconds) {
  return seconds === null ? '—' : `${num(seconds * 1000, seconds < 0.01 ? 2 : 1)} ms`;
}

export class BrokerView {
  constructor(ctx) {
    this.ctx = ctx;
    // The heading stays while the figures below it are redrawn, so focus
    // and the screen reader's place survive each scrape.
    this.body = h('div', {}, note('loading', 'Reading metrics…'));
    this.el = h('section', { class: 'view', 'aria-labelledby': 'broker-h' },
      h('h1', { id: 'broker-h' }, 'Broker'),
      h('p', { class: 'muted' }, 'Live from /metrics, every 2 s. Rates are over the last interval.'),
      this.body);
    this.rates = [];
    this.p99s = [];
    this.ackP99s = [];
    /** `/cluster` as last read; null before the first answer, and for a
     * token that may not read it. */
    this.cluster = null;
    /** Why the last read of `/cluster` failed; null when it answered. */
    this.clusterError = null;
    this.prev = null;
    /** The figures last drawn, redrawn when `/cluster` answers. */
    this.last = null;
    this.timer = null;
    this.clusterTimer = null;
  }

  mount(container) {
    container.append(this.el);
    // Only the root token may read the cluster view; others skip it.
    if (this.ctx.principal.root) this.clusterTick();
    return this.tick();
  }

  unmount() {
    clearTimeout(this.timer);
    clearTimeout(this.clusterTimer);
    this.timer = null;
    this.clusterTimer = null;
    this.el.remove();
  }

  async tick() {
    try {
      const at = performance.now();
      const cur = parsePrometheus(await metricsText());
      if (this.prev) {
        const sum = summarize(this.prev.m, cur, (at - this.prev.at) / 1000);
        this.rates = [...this.rates, sum.ingestRate].slice(-KEEP);
        this.p99s = [...this.p99s, sum.commitP99 ?? 0].slice(-KEEP);
        this.ackP99s = [...this.ackP99s, sum.ackP99 ?? 0].slice(-KEEP);
        this.last = sum;
        this.render(sum);
      }
      this.prev = { m: cur, at };
    } catch (e) {
      this.last = null;
      fill(this.body, note('error', `Could not read /metrics: ${e.message}`));
    }
    if (this.el.isConnected) this.timer = setTimeout(() => this.tick(), this.prev ? INTERVAL_MS : 200);
  }

  /** Reads `/cluster`, redraws, and reads it again two seconds after it answered. */
  async clusterTick() {
    try {
      this.cluster = clusterView(await this.ctx.session.get('/cluster'));
      this.clusterError = null;
    } catch (e) {
      this.clusterError = e.message;
    }
    if (!this.el.isConnected) return;
    if (this.last) this.render(this.last);
    this.clusterTimer = setTimeout(() => this.clusterTick(), INTERVAL_MS);
  }

  render(x) {
    const card = (label, value, extra) => h('div', { class: 'stat' }, h('div', { class: 'label' }, label), h('div', { class: 'value' }, value), extra);
    const rows = x.refusals.filter((r) => r.total > 0);
    fill(this.body,
      h('div', { class: 'stats', role: 'group', 'aria-label': 'Live figures' },
        card('Ingest (stored)', `${num(x.ingestRate)} msg/s`, sparkline(this.rates, 'Ingest rate, last two minutes')),
        card('Ack latency', `p50 ${ms(x.ackP50)} · p99 ${ms(x.ackP99)}`, sparkline(this.ackP99s, 'Ack latency p99, last two minutes')),
        card('Group-commit latency', `p50 ${ms(x.commitP50)} · p99 ${ms(x.commitP99)}`, sparkline(this.p99s, 'Commit latency p99, last two minutes')),
        card('Commits', `${num(x.batchRate)} /s`, h('div', { class: 'muted' }, `mean batch ${num(x.meanBatch, 1)} msg`)),
        card('MQTT connections', num(x.mqttConnections)),
        card('HTTP requests', `${num(x.httpRate)} /s`),
        card('Write queue', `${num(x.queueDepth)} waiting`),
        card('Tokens', num(x.tokens)),
        card('Stored since start', num(x.stored))),
      h('p', { class: 'hint' }, 'Ack latency: per group commit, the longest time from receiving a request or publish to its acknowledgement (reading the body, checks, queue wait and the commit). Group-commit latency is the storage part of it.'),
      this.renderCluster(),
      h('h2', {}, 'Refusals by reason'),
      rows.length
        ? h('div', { class: 'table-wrap' }, h('table', {},
          h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Where'), h('th', { scope: 'col' }, 'Reason'), h('th', { scope: 'col', class: 'num' }, 'Total'), h('th', { scope: 'col', class: 'num' }, 'Now /s'))),
          h('tbody', {}, rows.map((r) => h('tr', {},
            h('td', {}, r.source), h('td', {}, r.reason), h('td', { class: 'num' }, num(r.total)), h('td', { class: 'num' }, num(r.rate, 1)))))))
        : note('empty', 'No refusals since the broker started.'));
  }

  renderCluster() {
    if (!this.ctx.principal.root) return null;
    if (this.clusterError) return [h('h2', {}, 'Cluster'), note('error', `Could not read /cluster: ${this.clusterError}`)];
    const c = this.cluster;
    if (!c) return note('loading', 'Reading /cluster…');
    if (c.mode === 'standalone') return h('p', { class: 'muted', dataset: { cluster: 'standalone' } }, 'Standalone broker (no cluster).');
    const now = Date.now();
    return [
      h('h2', {}, 'Cluster'),
      c.stale ? note('error', 'This broker has lost its view of the cluster\'s tokens and refuses requests until it is back.') : null,
      h('p', { class: 'muted' }, `Token bucket revision ${num(c.newest)} is the newest any broker applied; this broker has ${num(c.pending)} change${c.pending === 1 ? '' : 's'} still to apply. Lag is in revisions behind the newest.`),
      h('div', { class: 'table-wrap' }, h('table', { class: 'nodes' },
        h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Broker'), h('th', { scope: 'col', class: 'num' }, 'Applied'),
          h('th', { scope: 'col', class: 'num' }, 'Lag'), h('th', { scope: 'col' }, 'Last heartbeat'), h('th', { scope: 'col' }, 'State'))),
        h('tbody', {}, c.nodes.map((n) => h('tr', {},
          h('th', { scope: 'row' }, h('code', {}, n.nodeId), n.self ? ' (this one)' : ''),
          h('td', { class: 'num' }, num(n.applied)),
          h('td', { class: 'num' }, num(n.lag)),
          h('td', {}, n.lastHeartbeat ? [timeEl(Date.parse(n.lastHeartbeat)), ` (${relative(Date.parse(n.lastHeartbeat), now)})`] : '—'),
          h('td', {}, n.stale ? h('span', { class: 'badge inactive' }, 'stale') : h('span', { class: 'badge active' }, 'live'))))))),
    ];
  }
}
