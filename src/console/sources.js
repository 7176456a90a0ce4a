// Where the devices view gets its data. Two of these stand in for APIs that
// do not exist yet, behind the interface their replacement will keep:
// - DeviceDirectory.list() derives the device list; the devices API
//   (`GET /applications/{app}/devices`, issue 12) will answer it directly.
// - LiveFeed polls history; the SSE stream (`GET /applications/{app}/stream`,
//   issue 11) will push the same states.

import { appPath } from './api.js';
import { allows, namedDevices } from './tree.js';

/** Most devices whose last-seen time the derived directory looks up. */
const MAX_DEVICES = 200;
/** Parallel history reads while deriving the directory. */
const PARALLEL = 6;
/** Most states one live poll reads; the rest come with the next polls. */
const MAX_PER_POLL = 2000;

function historyPath(app, device, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) q.set(k, String(v));
  return `${appPath(app, 'devices', device, 'state')}?${q}`;
}

/** Every page of a device's history in a range, following `next`. */
export async function* historyPages(session, app, device, params) {
  let cursor = null;
  do {
    const page = await session.get(historyPath(app, device, { ...params, cursor }));
    yield page.items;
    cursor = page.next;
  } while (cursor);
}

/**
 * The numeric values of one attribute over `[start, end]`, oldest first,
 * paged through the history API; stops after `maxItems` states read.
 * Returns `{points: [[ms, value]], read, truncated}`.
 */
export async function numericSeries(session, app, device, attr, start, end, maxItems = 50000) {
  const points = [];
  let read = 0;
  for await (const items of historyPages(session, app, device, { start, end, order: 'asc', limit: 5000 })) {
    for (const it of items) {
      const v = it.data[attr];
      if (typeof v === 'number' && Number.isFinite(v)) points.push([it.time, v]);
    }
    read += items.length;
    if (read >= maxItems) return { points, read, truncated: true };
  }
  return { points, read, truncated: false };
}

/** The devices of an application the signed-in token may look at. */
export class DeviceDirectory {
  constructor(session, app, principal) {
    this.session = session;
    this.app = app;
    this.principal = principal;
    /** Devices opened by id in this tab. */
    this.opened = new Set();
  }

  remember(device) {
    this.opened.add(device);
  }

  /** `[{device, lastSeen (ms or null), readable}]`, most recent first. */
  async list() {
    const ids = new Set(this.opened);
    const p = this.principal;
    if (!p.root && p.token.devices[0] !== '*') p.token.devices.forEach((d) => ids.add(d));
    if (p.root || allows(p.token.scope, 'token.read')) {
      const records = await this.session.get(appPath(this.app, 'tokens'));
      namedDevices(records).forEach((d) => ids.add(d));
    }
    const todo = [...ids].sort().slice(0, MAX_DEVICES);
    const out = [];
    const worker = async () => {
      while (todo.length) {
        const device = todo.shift();
        try {
          const page = await this.session.get(historyPath(this.app, device, { limit: 1 }));
          out.push({ device, lastSeen: page.items.length ? page.items[0].time : null, readable: true });
        } catch (e) {
          if (e.status !== 403) throw e;
          out.push({ device, lastSeen: null, readable: false });
        }
      }
    };
    await Promise.all(Array.from({ length: PARALLEL }, worker));
    out.sort((a, b) => (b.lastSeen ?? -1) - (a.lastSeen ?? -1) || a.device.localeCompare(b.device));
    return { devices: out, capped: ids.size > MAX_DEVICES };
  }
}

/**
 * New states of one device as they are stored, oldest first, delivered to
 * `onStates(items)`. Polls the history from the newest time seen so far
 * (ascending, so a burst is paged through rather than skipped); states at
 * that same time already delivered are skipped by count, which is exact
 * because the store orders equal times by commit sequence. A state sent
 * with a time older than the newest seen is not live news and is not shown
 * here (the SSE stream orders by commit, not by time, and will show it).
 */
export class LiveFeed {
  constructor(session, app, device, onStates, onError, intervalMs = 1500) {
    Object.assign(this, { session, app, device, onStates, onError, intervalMs });
    this.timer = null;
    this.stopped = false;
  }

  async start() {
    const page = await this.session.get(historyPath(this.app, this.device, { limit: 100 }));
    this.since = page.items.length ? page.items[0].time : 0;
    this.seenAtSince = page.items.filter((i) => i.time === this.since).length;
    this.schedule();
  }

  schedule() {
    if (!this.stopped) this.timer = setTimeout(() => this.poll(), this.intervalMs);
  }

  async poll() {
    try {
      let skip = this.seenAtSince;
      const fresh = [];
      for await (const items of historyPages(this.session, this.app, this.device, { start: this.since, order: 'asc', limit: 1000 })) {
        for (const it of items) {
          if (it.time === this.since && skip > 0) {
            skip -= 1;
            continue;
          }
          fresh.push(it);
        }
        if (this.stopped) return;
        // A burst larger than this is shown over several polls.
        if (fresh.length >= MAX_PER_POLL) break;
      }
      if (fresh.length) {
        const last = fresh[fresh.length - 1].time;
        const atLast = fresh.filter((i) => i.time === last).length;
        this.seenAtSince = last === this.since ? this.seenAtSince + atLast : atLast;
        this.since = last;
        this.onStates(fresh);
      }
    } catch (e) {
      this.onError(e);
    }
    this.schedule();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
  }
}
