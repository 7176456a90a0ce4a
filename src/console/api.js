// The admin API as the console uses it. The signed-in secret lives only in
// a private field of the Session object (memory of this tab): never in
// storage, cookies, the URL or the console log. Secrets of tokens minted in
// this tab are kept the same way, so the operator can mint under them.

/** An error answer of the admin API, with its stable code and detail. */
export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail ? `${code}: ${detail}` : code);
    this.status = status;
    this.code = code;
    this.detail = detail || '';
  }
}

async function send(method, path, secret, body) {
  const headers = {};
  if (secret) headers.Authorization = `Bearer ${secret}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'omit',
      cache: 'no-store',
      redirect: 'error',
      referrerPolicy: 'no-referrer',
    });
  } catch {
    throw new ApiError(0, 'unreachable', 'the broker did not answer');
  }
  if (res.status === 204) return null;
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!res.ok) {
    throw new ApiError(res.status, (json && json.error) || `http_${res.status}`, json && json.detail);
  }
  return json;
}

export class Session {
  #secret;
  #minted = new Map();

  /** `onRevoked` runs when the signed-in token stops being accepted. */
  constructor(secret, onRevoked) {
    this.#secret = secret;
    this.onRevoked = onRevoked;
  }

  /** Calls the admin API with the signed-in token. */
  async call(method, path, body) {
    if (!this.#secret) throw new ApiError(401, 'unauthorized', 'signed out');
    try {
      return await send(method, path, this.#secret, body);
    } catch (e) {
      if (e.status === 401 && this.onRevoked) this.onRevoked();
      throw e;
    }
  }

  get(path) {
    return this.call('GET', path);
  }

  /**
   * Calls the admin API as another token: one minted in this tab, or one
   * whose secret the operator pasted (`pasted`), kept once it is accepted.
   */
  async callAs(id, method, path, body, pasted) {
    const secret = pasted || this.#minted.get(id);
    if (!secret) throw new ApiError(401, 'unauthorized', 'this tab does not hold that token’s secret');
    const out = await send(method, path, secret, body);
    if (pasted) this.#minted.set(id, pasted);
    return out;
  }

  /**
   * Reads a Server-Sent Events stream with the signed-in token: calls
   * `onEvents([{id, event, data}])` with the events of each chunk read,
   * until the stream ends or `signal` aborts. EventSource cannot send an
   * Authorization header, so this is `fetch` with a streaming body reader.
   * Resolves once the stream is open, with `{ended}`: a promise of its
   * end (wrapped, since an async function resolving to a promise would
   * wait for that promise instead).
   */
  async stream(path, onEvents, signal) {
    if (!this.#secret) throw new ApiError(401, 'unauthorized', 'signed out');
    let res;
    try {
      res = await fetch(path, {
        headers: { Authorization: `Bearer ${this.#secret}`, Accept: 'text/event-stream' },
        credentials: 'omit',
        cache: 'no-store',
        redirect: 'error',
        referrerPolicy: 'no-referrer',
        signal,
      });
    } catch {
      throw new ApiError(0, 'unreachable', 'the broker did not answer');
    }
    if (!res.ok) {
      let json = null;
      try {
        json = await res.json();
      } catch {
        json = null;
      }
      if (res.status === 401 && this.onRevoked) this.onRevoked();
      throw new ApiError(res.status, (json && json.error) || `http_${res.status}`, json && json.detail);
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    const ended = (async () => {
      let buf = '';
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch {
          return;
        }
        if (chunk.done) return;
        buf += chunk.value.replaceAll('\r\n', '\n');
        const events = [];
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const ev = parseEvent(buf.slice(0, end));
          buf = buf.slice(end + 2);
          if (ev) events.push(ev);
        }
        if (events.length) onEvents(events);
      }
    })();
    return { ended };
  }

  /** Keeps a minted token's secret in memory so the tab can mint under it. */
  remember(id, secret) {
    this.#minted.set(id, secret);
  }

  holds(id) {
    return this.#minted.has(id);
  }

  /** Forgets every secret (sign-out). */
  forget() {
    this.#secret = null;
    this.#minted.clear();
  }
}

/** One SSE event block: `{id, event, data}`, or null for a comment. */
export function parseEvent(block) {
  const ev = { id: null, event: 'message', data: null };
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue;
    const at = line.indexOf(':');
    const field = at < 0 ? line : line.slice(0, at);
    let value = at < 0 ? '' : line.slice(at + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'id') ev.id = value;
    else if (field === 'event') ev.event = value;
    else if (field === 'data') ev.data = ev.data === null ? value : `${ev.data}\n${value}`;
  }
  return ev.data === null ? null : ev;
}

/** The caller's own record: `{root: true}` or `{root: false, token}`. */
export function whoami(secret) {
  return send('GET', '/whoami', secret);
}

/** Prometheus text of `/metrics` (no token needed). */
export async function metricsText() {
  const res = await fetch('/metrics', { cache: 'no-store', credentials: 'omit' });
  if (!res.ok) throw new ApiError(res.status, `http_${res.status}`);
  return res.text();
}

/** Path of one of an application's collections, ids encoded. */
export function appPath(app, ...rest) {
  return ['', 'applications', app, ...rest].map(encodeURIComponent).join('/');
}
