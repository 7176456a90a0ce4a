// Small DOM helpers. Everything the console shows is built with these and
// set as text, never parsed as HTML, so names and values that come from
// devices or tokens cannot inject markup or script.

const SVG_NS = 'http://www.w3.org/2000/svg';

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') {
      el.addEventListener(k.slice(2), v);
    } else if (k === 'class') {
      el.setAttribute('class', Array.isArray(v) ? v.filter(Boolean).join(' ') : v);
    } else if (k === 'dataset') {
      Object.assign(el.dataset, v);
    } else if (k === 'value' || k === 'checked' || k === 'disabled') {
      el[k] = v;
    } else {
      el.setAttribute(k, v === true ? '' : String(v));
    }
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Creates an HTML element: `h('p', {class: 'x'}, 'text', child)`. */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** Creates an SVG element the same way. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replaces the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  return build(el, {}, children);
}

let uid = 0;
/** A document-unique id for pairing labels with inputs. */
export function nextId(prefix) {
  uid += 1;
  return `${prefix}-${uid}`;
}

/** Epoch ms or an RFC 3339 string → epoch ms (null stays null). */
export function toMs(t) {
  if (t === null || t === undefined) return null;
  return typeof t === 'number' ? t : Date.parse(t);
}

/** A `<time>` element showing local time, with the exact UTC time as title. */
export function timeEl(t) {
  const ms = toMs(t);
  if (ms === null || Number.isNaN(ms)) return h('span', { class: 'muted' }, '—');
  const d = new Date(ms);
  return h('time', { datetime: d.toISOString(), title: d.toISOString() }, formatLocal(d));
}

export function formatLocal(d) {
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/** "12 s ago", "3 min ago", "in 2 d": for last-seen and expiry columns. */
export function relative(ms, now = Date.now()) {
  if (ms === null || ms === undefined) return '';
  const d = Math.round((now - ms) / 1000);
  const a = Math.abs(d);
  const unit = a < 60 ? `${a} s` : a < 3600 ? `${Math.round(a / 60)} min` : a < 86400 ? `${Math.round(a / 3600)} h` : `${Math.round(a / 86400)} d`;
  return d >= 0 ? `${unit} ago` : `in ${unit}`;
}

/** The value of a `datetime-local` input for epoch ms, in local time. */
export function toLocalInput(ms) {
  const d = new Date(ms);
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}

/** A status line that screen readers announce: empty, loading, error. */
export function note(kind, text) {
  return h('p', { class: ['note', kind], role: kind === 'error' ? 'alert' : 'status' }, text);
}

/**
 * A modal dialog (native `<dialog>`: focus stays inside, Escape cancels).
 * `buttons` are `{label, value, kind}`; resolves with the chosen value, or
 * null when cancelled. `onOpen(dialog)` may wire up content.
 */
export function modal(title, content, buttons, onOpen) {
  return new Promise((resolve) => {
    const titleId = nextId('dlg');
    const dlg = h('dialog', { 'aria-labelledby': titleId, class: 'modal' },
      h('h2', { id: titleId }, title),
      content,
      h('div', { class: 'actions' },
        buttons.map((b) => h('button', {
          type: 'button',
          class: b.kind || '',
          dataset: { value: b.value },
          onclick: () => dlg.close(b.value),
        }, b.label))));
    dlg.addEventListener('close', () => {
      const v = dlg.returnValue;
      dlg.remove();
      resolve(v && v !== 'cancel' ? v : null);
    });
    document.body.append(dlg);
    dlg.returnValue = '';
    dlg.showModal();
    if (onOpen) onOpen(dlg);
  });
}
