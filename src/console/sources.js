// Where the device view gets its data: history pages for the chart, and
// LiveFeed, which reads the application's live stream (SSE) for one
// device. The device list comes from the devices API (`directory.js`).

import { appPath } from './api.js';

/** Pause before the live stream is opened again after it broke. */
const RECONNECT_MS = 1500;

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

/**
 * New states of one device as they are committed, oldest first, delivered
 * to `onStates(items)` (`{time, data}`, as history items). Reads the
 * application's live stream limited to the device, from now on; if the
 * stream breaks, it is opened again from the last position received, so
 * nothing is missed or shown twice.
 */
export class LiveFeed {
  constructor(session, app, device, onStates, onError) {
    Object.assign(this, { session, app, device, onStates, onError });
    this.abort = new AbortController();
    this.position = null;
    this.stopped = false;
  }

  path() {
    const from = this.position === null ? 'now' : this.position;
    const q = new URLSearchParams({ devices: this.device, from });
    return `${appPath(this.app, 'stream')}?${q}`;
  }

  onEvents(events) {
    const items = [];
    for (const ev of events) {
      if (ev.event !== 'message') continue;
      const state = JSON.parse(ev.data);
      if (ev.id !== null) this.position = ev.id;
      items.push({ time: state.time, data: state.data });
    }
    if (items.length) this.onStates(items);
  }

  /** Opens the stream; resolves once it is open (rejects if refused). */
  async start() {
    const { ended } = await this.session.stream(this.path(), (evs) => this.onEvents(evs), this.abort.signal);
    this.follow(ended);
  }

  /** Opens the stream again whenever it ends, until stopped. */
  async follow(ended) {
    for (;;) {
      await ended;
      if (this.stopped) return;
      await new Promise((r) => setTimeout(r, RECONNECT_MS));
      if (this.stopped) return;
      try {
        ({ ended } = await this.session.stream(this.path(), (evs) => this.onEvents(evs), this.abort.signal));
      } catch (e) {
        if (this.stopped) return;
        this.onError(e);
        if (e.status === 401 || e.status === 403) return;
        ended = Promise.resolve();
      }
    }
  }

  stop() {
    this.stopped = true;
    this.abort.abort();
  }
}
