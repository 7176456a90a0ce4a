// The devices view: the application's devices with first and last seen
// (from the devices API, a page at a time), and one device's composite
// state, history chart and live states.

import { appPath } from './api.js';
import { lineChart } from './chart.js';
import { h, fill, nextId, note, relative, timeEl, toLocalInput } from './dom.js';
import { devicePage } from './directory.js';
import { LiveFeed, numericSeries } from './sources.js';

const ID_PATTERN = '[A-Za-z0-9_.\\-]{1,64}';
const RANGES = [
  ['15m', 'Last 15 minutes', 15 * 60e3],
  ['1h', 'Last hour', 3600e3],
  ['6h', 'Last 6 hours', 6 * 3600e3],
  ['24h', 'Last 24 hours', 24 * 3600e3],
  ['7d', 'Last 7 days', 7 * 86400e3],
  ['30d', 'Last 30 days', 30 * 86400e3],
  ['custom', 'Custom range', null],
];
/** Live states kept on screen. */
const LIVE_KEEP = 50;

export class DevicesView {
  constructor(ctx) {
    this.ctx = ctx;
    this.el = h('section', { class: 'view', 'aria-labelledby': 'devices-h' });
    this.detail = null;
  }

  mount(container) {
    container.append(this.el);
    return this.showList();
  }

  unmount() {
    if (this.detail) this.detail.stop();
    this.el.remove();
  }

  async showList() {
    if (this.detail) this.detail.stop();
    this.detail = null;
    const inputId = nextId('dev-open');
    const open = h('form', { class: 'inline', 'aria-label': 'Open a device by id' },
      h('label', { for: inputId }, 'Open device'),
      h('input', { id: inputId, name: 'device', required: true, pattern: ID_PATTERN, placeholder: 'device id', autocomplete: 'off', spellcheck: 'false' }),
      h('button', { type: 'submit' }, 'Open'));
    open.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const input = open.querySelector('input');
      if (!input.checkValidity()) {
        input.reportValidity();
        return;
      }
      this.openDevice(input.value);
    });
    const body = h('div', {}, note('loading', 'Reading the device list…'));
    fill(this.el,
      h('div', { class: 'view-head' }, h('h1', { id: 'devices-h' }, 'Devices'),
        h('button', { type: 'button', class: 'secondary', onclick: () => this.showList() }, 'Refresh')),
      open,
      body);
    let first;
    try {
      first = await devicePage(this.ctx.session, this.ctx.app);
    } catch (e) {
      fill(body, note('error', `Could not list devices: ${e.message}`));
      return;
    }
    if (!first.devices.length) {
      fill(body, note('empty', 'No device of this application has sent state yet (or none this token may read). Open a device by id above.'));
      return;
    }
    const now = Date.now();
    const rows = h('tbody', {});
    const more = h('button', { type: 'button', class: 'secondary' }, 'Show more devices');
    const status = h('p', { class: 'hint', role: 'status' });
    let next = first.next;
    const add = (devices) => rows.append(...devices.map((d) => h('tr', {},
      h('th', { scope: 'row' }, h('code', {}, d.device)),
      h('td', {}, timeEl(d.lastSeen), ` (${relative(d.lastSeen, now)})`),
      h('td', {}, timeEl(d.firstSeen)),
      h('td', { class: 'num' }, d.messages.toLocaleString('en-US')),
      h('td', {}, h('button', { type: 'button', onclick: () => this.openDevice(d.device), 'aria-label': `Open ${d.device}` }, 'Open')))));
    const shown = () => {
      const n = rows.children.length;
      status.textContent = `${n} device${n === 1 ? '' : 's'} shown${next ? '; more follow' : ''}.`;
      more.hidden = !next;
    };
    more.addEventListener('click', async () => {
      more.disabled = true;
      try {
        const page = await devicePage(this.ctx.session, this.ctx.app, next);
        next = page.next;
        add(page.devices);
        shown();
      } catch (e) {
        status.textContent = `Could not read more devices: ${e.message}`;
      }
      more.disabled = false;
    });
    add(first.devices);
    shown();
    fill(body,
      h('p', { class: 'muted' }, 'Every device that has stored state, by id, with when the broker first and last stored its state and how many states it stored.'),
      h('div', { class: 'table-wrap' }, h('table', { class: 'devices' },
        h('thead', {}, h('tr', {},
          h('th', { scope: 'col' }, 'Device'), h('th', { scope: 'col' }, 'Last seen'), h('th', { scope: 'col' }, 'First seen'),
          h('th', { scope: 'col', class: 'num' }, 'States'), h('th', { scope: 'col' }, h('span', { class: 'sr-only' }, 'Actions')))),
        rows)),
      status,
      more);
  }

  openDevice(device) {
    this.detail = new DeviceDetail(this.ctx, device, () => this.showList());
    fill(this.el, this.detail.el);
    this.detail.el.querySelector('h1').tabIndex = -1;
    this.detail.el.querySelector('h1').focus({ preventScroll: true });
    this.detail.start();
  }
}

class DeviceDetail {
  constructor(ctx, device, back) {
    this.ctx = ctx;
    this.device = device;
    this.range = '1h';
    this.attr = null;
    this.series = null;
    this.live = [];
    this.feed = null;
    this.composite = h('div', {}, note('loading', 'Loading state…'));
    this.chartBox = h('div', { class: 'chart-box' });
    this.controls = h('form', { class: 'chart-controls', 'aria-label': 'Chart' });
    this.liveList = h('ol', { class: 'live', 'aria-live': 'polite', 'aria-relevant': 'additions' });
    this.liveStatus = h('p', { class: 'hint', role: 'status' }, 'Starting…');
    this.el = h('div', { class: 'device' },
      h('div', { class: 'view-head start' },
        h('button', { type: 'button', class: 'secondary', onclick: back }, '← All devices'),
        h('h1', { id: 'devices-h' }, 'Device ', h('code', {}, device))),
      h('div', { class: 'panels' },
        h('section', { class: 'panel', 'aria-labelledby': 'cs-h' }, h('h2', { id: 'cs-h' }, 'Composite state'), this.composite),
        h('section', { class: 'panel wide', 'aria-labelledby': 'hist-h' }, h('h2', { id: 'hist-h' }, 'History'), this.controls, this.chartBox),
        h('section', { class: 'panel', 'aria-labelledby': 'live-h' }, h('h2', { id: 'live-h' }, 'Live'), this.liveStatus, this.liveList)));
  }

  path(...rest) {
    return appPath(this.ctx.app, 'devices', this.device, ...rest);
  }

  async start() {
    const attrs = await this.loadComposite();
    if (attrs === null) return;
    this.attr = attrs[0] ?? null;
    this.renderControls(attrs);
    await this.drawChart();
    this.feed = new LiveFeed(this.ctx.session, this.ctx.app, this.device,
      (items) => this.onLive(items),
      (e) => { this.liveStatus.textContent = `Live stream failed: ${e.message}`; });
    try {
      await this.feed.start();
      this.liveStatus.textContent = 'Watching for new states (live stream).';
    } catch (e) {
      this.liveStatus.textContent = `Cannot watch: ${e.message}`;
    }
  }

  stop() {
    if (this.feed) this.feed.stop();
  }

  /** Shows the composite state; returns its numeric attributes, or null when unreadable. */
  async loadComposite() {
    let cs;
    try {
      cs = await this.ctx.session.get(this.path('compositeState'));
    } catch (e) {
      fill(this.composite, note('error', e.status === 403 ? 'This token may not read this device.' : `Could not read state: ${e.message}`));
      fill(this.chartBox);
      this.liveStatus.textContent = '';
      return null;
    }
    const names = Object.keys(cs).sort();
    fill(this.composite, names.length
      ? h('div', { class: 'table-wrap' }, h('table', { class: 'composite' },
        h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Attribute'), h('th', { scope: 'col' }, 'Value'), h('th', { scope: 'col' }, 'Time'))),
        h('tbody', {}, names.map((n) => h('tr', {},
          h('th', { scope: 'row' }, n), h('td', {}, h('code', {}, JSON.stringify(cs[n].value))), h('td', {}, timeEl(cs[n].time)))))))
      : note('empty', 'This device has not sent any state yet.'));
    return names.filter((n) => typeof cs[n].value === 'number');
  }

  renderControls(attrs) {
    const attrId = nextId('attr');
    const rangeId = nextId('range');
    const startId = nextId('start');
    const endId = nextId('end');
    const now = Date.now();
    const custom = h('div', { class: 'row custom', hidden: this.range !== 'custom' },
      h('div', {}, h('label', { for: startId }, 'From'), h('input', { id: startId, name: 'start', type: 'datetime-local', value: toLocalInput(now - 3600e3) })),
      h('div', {}, h('label', { for: endId }, 'To'), h('input', { id: endId, name: 'end', type: 'datetime-local', value: toLocalInput(now + 60e3) })));
    fill(this.controls,
      h('div', { class: 'row' },
        h('div', {}, h('label', { for: attrId }, 'Attribute'),
          attrs.length
            ? h('select', { id: attrId, name: 'attr' }, attrs.map((a) => h('option', { value: a, selected: a === this.attr }, a)))
            : h('select', { id: attrId, name: 'attr', disabled: true }, h('option', {}, 'no numeric attribute'))),
        h('div', {}, h('label', { for: rangeId }, 'Range'),
          h('select', { id: rangeId, name: 'range' }, RANGES.map(([v, label]) => h('option', { value: v, selected: v === this.range }, label)))),
        h('div', { class: 'end' }, h('button', { type: 'submit' }, 'Draw'))),
      custom);
    this.controls.onchange = (ev) => {
      if (ev.target.name === 'range') custom.hidden = ev.target.value !== 'custom';
      if (ev.target.name === 'attr' || (ev.target.name === 'range' && ev.target.value !== 'custom')) this.controls.requestSubmit();
    };
    this.controls.onsubmit = (ev) => {
      ev.preventDefault();
      const f = (n) => this.controls.querySelector(`[name="${n}"]`);
      this.attr = attrs.length ? f('attr').value : null;
      this.range = f('range').value;
      this.drawChart();
    };
  }

  window() {
    if (this.range === 'custom') {
      const f = (n) => this.controls.querySelector(`[name="${n}"]`).value;
      return { start: new Date(f('start')).getTime(), end: new Date(f('end')).getTime(), sliding: false };
    }
    const span = RANGES.find(([v]) => v === this.range)[2];
    const end = Date.now();
    return { start: end - span, end, sliding: true };
  }

  async drawChart() {
    if (!this.attr) {
      this.series = null;
      fill(this.chartBox, note('empty', 'No numeric attribute to chart.'));
      return;
    }
    const w = this.window();
    if (!(w.end > w.start)) {
      fill(this.chartBox, note('error', 'The range must end after it starts.'));
      return;
    }
    fill(this.chartBox, note('loading', 'Loading history…'));
    try {
      const s = await numericSeries(this.ctx.session, this.ctx.app, this.device, this.attr, Math.floor(w.start), Math.floor(w.end));
      this.series = { ...s, ...w, attr: this.attr };
      this.paint();
    } catch (e) {
      fill(this.chartBox, note('error', `Could not read history: ${e.message}`));
    }
  }

  paint() {
    const { points, start, end, attr, read, truncated } = this.series;
    if (!points.length) {
      fill(this.chartBox, note('empty', read ? `None of the ${read} states in this range has a numeric “${attr}”.` : 'No states in this range. Try a longer one.'));
      return;
    }
    const vals = points.map((p) => p[1]);
    const last = points[points.length - 1];
    fill(this.chartBox,
      lineChart({ points, start, end, title: `${attr} of ${this.device} from ${new Date(start).toISOString()} to ${new Date(end).toISOString()}` }),
      h('p', { class: 'hint', dataset: { points: String(points.length) } },
        `${points.length} value${points.length === 1 ? '' : 's'} of “${attr}”; min ${Math.min(...vals)}, max ${Math.max(...vals)}, latest ${last[1]} at `, timeEl(last[0]), '.'),
      truncated ? note('empty', `Only the first ${read} states of this range are drawn; choose a shorter range for the rest.`) : null);
  }

  onLive(items) {
    this.live = [...items.reverse(), ...this.live].slice(0, LIVE_KEEP);
    fill(this.liveList, this.live.map((it) => h('li', {}, timeEl(it.time), ' ', h('code', {}, JSON.stringify(it.data)))));
    this.loadComposite();
    if (this.series && this.series.sliding) {
      const span = this.series.end - this.series.start;
      const end = Date.now();
      const fresh = items.filter((it) => typeof it.data[this.series.attr] === 'number').map((it) => [it.time, it.data[this.series.attr]]);
      const points = [...this.series.points, ...fresh].filter((p) => p[0] >= end - span).sort((a, b) => a[0] - b[0]);
      this.series = { ...this.series, points, start: end - span, end: Math.max(end, ...fresh.map((p) => p[0])) };
      this.paint();
    }
  }
}
