// Reading the broker's Prometheus text (`GET /metrics`) in the page: a
// parser, and the figures the broker view shows, computed from two scrapes.

/** Parses Prometheus/OpenMetrics text into `Map<name, [{labels, value}]>`. */
export function parsePrometheus(text) {
  const out = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
      let l;
      while ((l = re.exec(m[3]))) labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === 'n' ? '\n' : c));
    }
    const value = m[4] === '+Inf' ? Infinity : m[4] === '-Inf' ? -Infinity : Number(m[4]);
    if (!out.has(m[1])) out.set(m[1], []);
    out.get(m[1]).push({ labels, value });
  }
  return out;
}

/** Sum of every series of a metric whose labels match `where`. */
export function total(metrics, name, where = () => true) {
  return (metrics.get(name) || []).filter((x) => where(x.labels)).reduce((a, x) => a + x.value, 0);
}

/**
 * The `q` quantile (0..1) of what a histogram observed between two scrapes,
 * interpolated within the bucket as Prometheus' histogram_quantile does;
 * null when nothing was observed.
 */
export function quantileBetween(prev, cur, name, q) {
  const buckets = (m) => new Map((m.get(`${name}_bucket`) || []).map((b) => [Number(b.labels.le === '+Inf' ? Infinity : b.labels.le), b.value]));
  const a = buckets(prev);
  const b = buckets(cur);
  const les = [...b.keys()].sort((x, y) => x - y);
  if (!les.length) return null;
  const counts = les.map((le) => b.get(le) - (a.get(le) || 0));
  const n = counts[counts.length - 1];
  if (!(n > 0)) return null;
  const rank = q * n;
  for (let i = 0; i < les.length; i += 1) {
    if (counts[i] >= rank) {
      const upper = les[i];
      const lower = i ? les[i - 1] : 0;
      if (upper === Infinity) return lower;
      const below = i ? counts[i - 1] : 0;
      const inBucket = counts[i] - below;
      return inBucket > 0 ? lower + ((upper - lower) * (rank - below)) / inBucket : upper;
    }
  }
  return les[les.length - 2] ?? null;
}

const HTTP_REASONS = {
  400: 'bad request', 401: 'unauthorized', 403: 'forbidden', 404: 'not found', 405: 'method not allowed',
  408: 'timeout', 413: 'payload too large', 415: 'unsupported media type', 429: 'rate limited',
  500: 'internal error', 503: 'overloaded',
};

/** Refusal series: `[{key, source, reason, total}]`, from one scrape. */
export function refusals(m) {
  const rows = [];
  for (const x of m.get('sluice_http_requests_total') || []) {
    if (x.labels.status !== '200') {
      rows.push({ key: `http:${x.labels.status}`, source: 'HTTP', reason: `${x.labels.status} ${HTTP_REASONS[x.labels.status] || ''}`.trim(), total: x.value });
    }
  }
  const byOutcome = (name, source) => {
    const sums = new Map();
    for (const x of m.get(name) || []) {
      if (x.labels.outcome === 'accepted') continue;
      sums.set(x.labels.outcome, (sums.get(x.labels.outcome) || 0) + x.value);
    }
    for (const [outcome, v] of sums) rows.push({ key: `${name}:${outcome}`, source, reason: outcome.replaceAll('_', ' '), total: v });
  };
  byOutcome('sluice_mqtt_connects_total', 'MQTT CONNECT');
  byOutcome('sluice_mqtt_publishes_total', 'MQTT PUBLISH');
  const limited = total(m, 'sluice_rate_limited_total');
  rows.push({ key: 'rate_limited', source: 'Token rate limits', reason: 'rate limited (all listeners)', total: limited });
  rows.push({ key: 'revoked', source: 'MQTT sessions', reason: 'closed by revocation or expiry', total: total(m, 'sluice_mqtt_sessions_revoked_total') });
  rows.push({ key: 'commit_errors', source: 'Writer', reason: 'failed group commits', total: total(m, 'sluice_commit_errors_total') });
  return rows;
}

/**
 * What the broker view shows, from two scrapes `seconds` apart: rates over
 * that interval, commit and ack latency quantiles of the commits in it
 * (ack latency: per commit, its oldest request's, receipt to ack), gauges now,
 * and refusals with their totals and rates.
 */
export function summarize(prev, cur, seconds) {
  const rate = (name) => Math.max(0, total(cur, name) - total(prev, name)) / seconds;
  const stored = total(cur, 'sluice_messages_stored_total') - total(prev, 'sluice_messages_stored_total');
  const batches = total(cur, 'sluice_batches_committed_total') - total(prev, 'sluice_batches_committed_total');
  const before = new Map(refusals(prev).map((r) => [r.key, r.total]));
  return {
    ingestRate: rate('sluice_messages_stored_total'),
    batchRate: rate('sluice_batches_committed_total'),
    meanBatch: batches > 0 ? stored / batches : null,
    httpRate: rate('sluice_http_requests_total'),
    commitP50: quantileBetween(prev, cur, 'sluice_commit_duration_seconds', 0.5),
    commitP99: quantileBetween(prev, cur, 'sluice_commit_duration_seconds', 0.99),
    ackP50: quantileBetween(prev, cur, 'sluice_ack_latency_seconds', 0.5),
    ackP99: quantileBetween(prev, cur, 'sluice_ack_latency_seconds', 0.99),
    queueDepth: total(cur, 'sluice_queue_depth'),
    mqttConnections: total(cur, 'sluice_mqtt_connections'),
    tokens: total(cur, 'sluice_token_cache_entries'),
    stored: total(cur, 'sluice_messages_stored_total'),
    refusals: refusals(cur).map((r) => ({ ...r, rate: Math.max(0, r.total - (before.get(r.key) || 0)) / seconds })),
  };
}
