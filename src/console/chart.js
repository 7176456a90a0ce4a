// Charts drawn as SVG by hand: a time series with axes, and a sparkline.
// The scale helpers are pure so they can be tested without a page.

import { s } from './dom.js';

/** About `count` round values spanning [min, max]. */
export function niceTicks(min, max, count = 5) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [];
  if (min === max) return [min];
  const raw = (max - min) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw);
  const out = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) {
    out.push(Number(v.toPrecision(12)));
  }
  return out;
}

const SEC = 1000;
const MIN = 60 * SEC;
const HOUR = 60 * MIN;
const DAY = 24 * HOUR;
const TIME_STEPS = [SEC, 5 * SEC, 15 * SEC, 30 * SEC, MIN, 5 * MIN, 15 * MIN, 30 * MIN, HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 7 * DAY, 30 * DAY];

/** About `count` round instants in [start, end] (local time for days). */
export function timeTicks(start, end, count = 6) {
  if (!(end > start)) return [];
  const step = TIME_STEPS.find((st) => (end - start) / st <= count) ?? TIME_STEPS[TIME_STEPS.length - 1];
  const offset = step >= DAY ? new Date(start).getTimezoneOffset() * MIN : 0;
  const out = [];
  for (let t = Math.ceil((start - offset) / step) * step + offset; t <= end; t += step) out.push(t);
  return out;
}

/**
 * At most `2 × buckets` points that keep the shape of the series: the
 * lowest and highest point of each time bucket, in time order.
 */
export function downsample(points, buckets) {
  if (points.length <= 2 * buckets) return points;
  const t0 = points[0][0];
  const span = points[points.length - 1][0] - t0 || 1;
  const out = [];
  let cur = -1;
  let lo = null;
  let hi = null;
  const flush = () => {
    if (lo) out.push(...(lo === hi ? [lo] : lo[0] <= hi[0] ? [lo, hi] : [hi, lo]));
  };
  for (const p of points) {
    const b = Math.min(buckets - 1, Math.floor(((p[0] - t0) / span) * buckets));
    if (b !== cur) {
      flush();
      cur = b;
      lo = p;
      hi = p;
    } else {
      if (p[1] < lo[1]) lo = p;
      if (p[1] > hi[1]) hi = p;
    }
  }
  flush();
  return out;
}

function timeLabel(t, span) {
  const d = new Date(t);
  const p = (n) => String(n).padStart(2, '0');
  const hm = `${p(d.getHours())}:${p(d.getMinutes())}`;
  if (span <= 5 * MIN) return `${hm}:${p(d.getSeconds())}`;
  if (span <= DAY) return hm;
  return `${p(d.getMonth() + 1)}-${p(d.getDate())} ${hm}`;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
  return String(Number(v.toPrecision(6)));
}

/** A time-series line chart over [start, end] as an SVG element. */
export function lineChart({ points, start, end, title, width = 800, height = 280 }) {
  const m = { l: 64, r: 16, t: 12, b: 32 };
  const w = width - m.l - m.r;
  const hgt = height - m.t - m.b;
  let lo = Math.min(...points.map((p) => p[1]));
  let hi = Math.max(...points.map((p) => p[1]));
  if (lo === hi) {
    lo -= 1;
    hi += 1;
  }
  const pad = (hi - lo) * 0.05;
  lo -= pad;
  hi += pad;
  const x = (t) => m.l + ((t - start) / (end - start || 1)) * w;
  const y = (v) => m.t + (1 - (v - lo) / (hi - lo)) * hgt;
  const span = end - start;
  const drawn = downsample(points, Math.floor(w));
  const path = drawn.map((p, i) => `${i ? 'L' : 'M'}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join('');
  return s('svg', { viewBox: `0 0 ${width} ${height}`, class: 'chart', role: 'img', 'aria-label': title },
    s('title', {}, title),
    s('g', { class: 'grid' },
      niceTicks(lo, hi, 5).map((v) => s('g', {},
        s('line', { x1: m.l, x2: m.l + w, y1: y(v), y2: y(v) }),
        s('text', { x: m.l - 6, y: y(v), 'text-anchor': 'end', 'dominant-baseline': 'middle' }, fmt(v)))),
      timeTicks(start, end, Math.max(2, Math.floor(w / 110))).map((t) => s('g', {},
        s('line', { x1: x(t), x2: x(t), y1: m.t, y2: m.t + hgt }),
        s('text', { x: x(t), y: m.t + hgt + 18, 'text-anchor': 'middle' }, timeLabel(t, span))))),
    s('rect', { class: 'frame', x: m.l, y: m.t, width: w, height: hgt }),
    s('path', { class: 'series', d: path }),
    drawn.length <= 60 ? drawn.map((p) => s('circle', { class: 'point', cx: x(p[0]), cy: y(p[1]), r: 2.5 })) : null);
}

/** A small line of recent values (newest last), e.g. the ingest rate. */
export function sparkline(values, label, width = 240, height = 48) {
  const hi = Math.max(1e-9, ...values);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const d = values.map((v, i) => `${i ? 'L' : 'M'}${(i * step).toFixed(1)},${(height - 2 - (v / hi) * (height - 4)).toFixed(1)}`).join('');
  return s('svg', { viewBox: `0 0 ${width} ${height}`, class: 'spark', role: 'img', 'aria-label': label },
    s('path', { class: 'series', d }));
}
