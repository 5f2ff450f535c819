// plexus.js: the Plexus browser client (also runs on Node 20 with a `websocket` constructor).
//
// One dependency-free ES module, no build step. It speaks the native protocol of
// docs/protocol.md (Centrifugo client protocol v2, JSON) over WebSocket, or SSE / HTTP
// streaming with commands POSTed to the emulation endpoint, and keeps the connection and its
// subscriptions alive: full-jitter exponential backoff, a watchdog on the server's pings,
// token refresh, resubscribe with recovery (no gaps, no duplicates), an offline publish queue.
//
//   import { Plexus } from '/plexus.js';
//   const client = new Plexus('/connection/websocket', { token });
//   const sub = client.newSubscription('chat:lobby');
//   sub.on('publication', ({ data }) => console.log(data));
//   sub.subscribe();
//   client.connect();
//
// Delta compression: `newSubscription(channel, { delta: 'fossil' })` in namespaces that allow
// it; publications then come as Fossil deltas from the previous one and are rebuilt here.
// Filtering by tags: `{ tagsFilter: { key: 'ticker', cmp: 'eq', val: 'BTC' } }` (the server
// sends only the publications whose tags match; namespaces with `allow_tags_filter`).
//
// What it deliberately does not do: protobuf, batching across ticks, the SockJS or
// WebTransport transports.

export const VERSION = '0.1.0';

/** Codes of errors made by the client itself (server error codes are 100 and up). */
export const ErrorCode = Object.freeze({
  timeout: 0, // no reply within `timeout` ms
  queueFull: 1, // the offline queue holds `maxQueued` commands already
  connectionClosed: 2, // the connection ended before the reply came
  unsubscribed: 3, // the subscription was unsubscribed before it was subscribed
  disconnected: 4, // disconnect() was called
  badReply: 5, // the server sent something that is not the protocol
});

/** Codes of `connecting` and `disconnected` events the client makes itself. Close codes of the
 *  server (3000 and up) and of WebSocket (1000 and up) are passed through as they are. */
export const ClientCode = Object.freeze({
  connectCalled: 0,
  disconnectCalled: 1,
  transportClosed: 2,
  noPing: 3,
  connectTimeout: 4,
  subscribeTimeout: 5,
  tokenExpired: 6,
  unauthorized: 7,
  badProtocol: 8,
  emulationFailed: 9,
  unsubscribeCalled: 10,
});

/** A failed command or operation: `code` is a server error code (100+) or an `ErrorCode`. */
export class PlexusError extends Error {
  constructor(code, message, temporary = false) {
    super(message);
    this.name = 'PlexusError';
    this.code = code;
    this.temporary = temporary;
  }
}

/** Thrown by a `getToken` function to say the user may not connect (or subscribe): the client
 *  stops instead of retrying. */
export class UnauthorizedError extends Error {
  constructor(message = 'unauthorized') {
    super(message);
    this.name = 'UnauthorizedError';
  }
}

/** Full jitter: a delay in [0, min(max, min * 2^attempt)] ms. */
export function backoff(attempt, min, max, random = Math.random) {
  const cap = Math.min(max, min * 2 ** Math.min(attempt, 31));
  return Math.floor(random() * (cap + 1));
}

const realClock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (timer) => clearTimeout(timer),
};

/** Error codes that are worth retrying: client-made ones and those the server marks temporary. */
function isTemporary(error) {
  return error.code < 100 || error.temporary === true;
}

function report(error) {
  // A listener threw: surface it without breaking the client's own bookkeeping.
  if (typeof globalThis.reportError === 'function') globalThis.reportError(error);
  else queueMicrotask(() => { throw error; });
}

/** `on(event, fn)` returns a function that removes `fn` again. */
class Emitter {
  constructor() {
    this._listeners = new Map();
  }

  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  once(event, fn) {
    const off = this.on(event, (ctx) => { off(); fn(ctx); });
    return off;
  }

  off(event, fn) {
    if (fn === undefined) this._listeners.delete(event);
    else this._listeners.get(event)?.delete(fn);
  }

  _emit(event, ctx) {
    const listeners = this._listeners.get(event);
    if (!listeners) return;
    for (const fn of [...listeners]) {
      try {
        fn(ctx);
      } catch (error) {
        report(error);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Transports. Each has open(connectFrame), send(frame), close() and calls back
// handlers.message(text) and, at most once and never after close(), handlers.close({code, reason}).

function resolveEndpoint(endpoint, scheme) {
  const url = new URL(endpoint, globalThis.location?.href);
  const secure = url.protocol === 'https:' || url.protocol === 'wss:';
  if (scheme === 'ws' && (url.protocol === 'http:' || url.protocol === 'https:')) {
    url.protocol = secure ? 'wss:' : 'ws:';
  }
  if (scheme === 'http' && (url.protocol === 'ws:' || url.protocol === 'wss:')) {
    url.protocol = secure ? 'https:' : 'http:';
  }
  return url.toString();
}

const noop = () => {};

function webSocketTransport(endpoint, options, handlers) {
  let socket = null;
  let closed = false;
  const end = (ctx) => {
    if (closed) return;
    closed = true;
    handlers.close(ctx);
  };
  return {
    name: 'websocket',
    open(connectFrame) {
      const WebSocketClass = options.websocket ?? globalThis.WebSocket;
      if (typeof WebSocketClass !== 'function') {
        throw new Error('no WebSocket implementation: pass the `websocket` option');
      }
      socket = new WebSocketClass(resolveEndpoint(endpoint, 'ws'));
      socket.onopen = () => socket.send(connectFrame);
      socket.onmessage = (event) => {
        if (typeof event.data === 'string') handlers.message(event.data);
      };
      socket.onerror = noop; // a close event follows
      socket.onclose = (event) => end({ code: event.code, reason: event.reason ?? '' });
    },
    send(frame) {
      socket.send(frame);
    },
    close() {
      closed = true;
      if (!socket) return;
      // Handlers stay functions: the `ws` package throws on an 'error' event nobody listens to.
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = noop;
      try {
        socket.close();
      } catch {
        // already closing
      }
    },
  };
}

/**
 * What SSE and HTTP streaming share: commands go as `POST emulationEndpoint` with the session
 * and node of the connect reply, one request at a time so the server sees them in order.
 */
function emulation(options, end, signal) {
  const fetchFn = options.fetch ?? globalThis.fetch;
  let chain = Promise.resolve();
  return (frame, ids) => {
    const body = JSON.stringify({ session: ids.session, node: ids.node, data: frame });
    chain = chain.then(() => fetchFn(options.emulationEndpoint, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body,
      signal,
    }).then((response) => {
      // 404: the server no longer has the session (or the node); the stream is useless.
      if (response.status === 404 || response.status >= 500) {
        end({ code: ClientCode.emulationFailed, reason: `emulation answered ${response.status}` });
      }
    }, () => {
      if (!signal.aborted) end({ code: ClientCode.emulationFailed, reason: 'emulation request failed' });
    }));
  };
}

function sseTransport(endpoint, options, handlers) {
  let source = null;
  let closed = false;
  const abort = new AbortController();
  const end = (ctx) => {
    if (closed) return;
    closed = true;
    source?.close();
    abort.abort();
    handlers.close(ctx);
  };
  const post = emulation(options, end, abort.signal);
  return {
    name: 'sse',
    open(connectFrame) {
      const EventSourceClass = options.eventsource ?? globalThis.EventSource;
      if (typeof EventSourceClass !== 'function') {
        throw new Error('no EventSource implementation: pass the `eventsource` option');
      }
      const url = new URL(resolveEndpoint(endpoint, 'http'));
      url.searchParams.set('cf_connect', connectFrame);
      source = new EventSourceClass(url.toString());
      source.onmessage = (event) => handlers.message(String(event.data));
      // EventSource would reconnect by itself, with the same stale connect command: never.
      source.onerror = () => end({ code: ClientCode.transportClosed, reason: 'event stream closed' });
    },
    send(frame, ids) {
      post(frame, ids);
    },
    close() {
      closed = true;
      source?.close();
      abort.abort();
    },
  };
}

function httpStreamTransport(endpoint, options, handlers) {
  let closed = false;
  const abort = new AbortController();
  const end = (ctx) => {
    if (closed) return;
    closed = true;
    abort.abort();
    handlers.close(ctx);
  };
  const post = emulation(options, end, abort.signal);
  return {
    name: 'http_stream',
    open(connectFrame) {
      const fetchFn = options.fetch ?? globalThis.fetch;
      fetchFn(resolveEndpoint(endpoint, 'http'), {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: connectFrame,
        signal: abort.signal,
      }).then(async (response) => {
        if (!response.ok || !response.body) throw new Error(`http stream answered ${response.status}`);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffered = '';
        for (;;) {
          const { done, value } = await reader.read();
          if (closed) return;
          if (done) break;
          buffered += decoder.decode(value, { stream: true });
          let newline;
          while ((newline = buffered.indexOf('\n')) >= 0) {
            const line = buffered.slice(0, newline);
            buffered = buffered.slice(newline + 1);
            if (line.trim() !== '') handlers.message(line);
            if (closed) return;
          }
        }
        if (buffered.trim() !== '') handlers.message(buffered);
        end({ code: ClientCode.transportClosed, reason: 'stream ended' });
      }).catch((error) => {
        end({ code: ClientCode.transportClosed, reason: String(error?.message ?? error) });
      });
    },
    send(frame, ids) {
      post(frame, ids);
    },
    close() {
      closed = true;
      abort.abort();
    },
  };
}

const TRANSPORTS = { websocket: webSocketTransport, sse: sseTransport, http_stream: httpStreamTransport };

// ---------------------------------------------------------------------------------------------

function publicationContext(channel, pub) {
  const ctx = { channel, data: pub.data, offset: pub.offset ?? 0 };
  if (pub.info) ctx.info = clientInfo(pub.info);
  if (pub.tags) ctx.tags = pub.tags;
  return ctx;
}

function clientInfo(info) {
  const out = { user: info.user ?? '', client: info.client ?? '' };
  if (info.conn_info !== undefined) out.connInfo = info.conn_info;
  if (info.chan_info !== undefined) out.chanInfo = info.chan_info;
  return out;
}

const DEFAULTS = {
  token: '',
  getToken: null,
  name: 'plexus.js',
  data: undefined,
  debug: false,
  minReconnectDelay: 500,
  maxReconnectDelay: 20000,
  timeout: 5000,
  maxQueued: 1000,
  pingMargin: 5000,
  transports: null,
  websocket: null,
  eventsource: null,
  fetch: null,
  emulationEndpoint: null,
  clock: realClock,
  random: Math.random,
};

/**
 * A connection to Plexus. States: 'disconnected' → connect() → 'connecting' → 'connected';
 * losing the connection goes back to 'connecting' (and reconnects) unless the server said not
 * to (code 3500+), which ends in 'disconnected'.
 */
export class Plexus extends Emitter {
  constructor(url, options = {}) {
    super();
    if (Array.isArray(url)) options = { ...options, transports: url };
    this._options = { ...DEFAULTS, ...options };
    const list = this._options.transports ?? [{ transport: 'websocket', endpoint: url }];
    if (list.length === 0) throw new TypeError('plexus: no transport');
    for (const { transport, endpoint } of list) {
      if (!TRANSPORTS[transport]) throw new TypeError(`plexus: unknown transport ${transport}`);
      if (!endpoint) throw new TypeError(`plexus: no endpoint for ${transport}`);
    }
    this._transports = list;
    // By default `/emulation` on the host of the first stream transport.
    this._options.emulationEndpoint ??= (() => {
      const stream = list.find((spec) => spec.transport !== 'websocket') ?? list[0];
      try {
        return new URL('/emulation', resolveEndpoint(stream.endpoint, 'http')).toString();
      } catch {
        return '/emulation';
      }
    })();
    this._clock = this._options.clock;

    /** 'disconnected' | 'connecting' | 'connected' */
    this.state = 'disconnected';
    /** The client id the server gave the current connection. */
    this.client = null;
    /** The transport of the current (or last) connection. */
    this.transport = null;

    this._token = this._options.token || '';
    this._needToken = !this._token && !!this._options.getToken;
    this._subs = new Map(); // channel → Subscription
    this._serverSubs = new Map(); // channel → {recoverable, epoch, offset} (server-side)
    this._calls = new Map(); // id → {method, done, timer}
    this._queue = []; // commands waiting for a connection
    this._outbox = []; // frames of this tick, sent together
    this._nextId = 1;
    this._attempt = 0; // reconnect attempts since the last successful connect
    this._transportIndex = 0;
    this._transportKnown = false; // a transport worked: keep it
    this._conn = null; // the transport of the current attempt
    this._ready = false; // the current connection got its connect reply
    this._epoch = 0; // bumped by every new attempt and teardown: stale callbacks check it
    this._timers = { reconnect: null, connect: null, ping: null, refresh: null };
  }

  // --- public API ----------------------------------------------------------------------------

  connect() {
    if (this.state !== 'disconnected') return;
    this._attempt = 0;
    this._setState('connecting');
    this._emit('connecting', { code: ClientCode.connectCalled, reason: 'connect called' });
    this._startAttempt();
  }

  disconnect() {
    if (this.state === 'disconnected') return;
    this._stop(ClientCode.disconnectCalled, 'disconnect called');
  }

  /** Sets the connection token used by the next connect (getToken, if given, still refreshes it). */
  setToken(token) {
    this._token = token;
    this._needToken = false;
  }

  newSubscription(channel, options = {}) {
    if (this._subs.has(channel)) throw new Error(`plexus: already have a subscription to ${channel}`);
    const sub = new Subscription(this, channel, options);
    this._subs.set(channel, sub);
    return sub;
  }

  getSubscription(channel) {
    return this._subs.get(channel) ?? null;
  }

  subscriptions() {
    return Object.fromEntries(this._subs);
  }

  removeSubscription(sub) {
    if (!sub) return;
    sub.unsubscribe();
    if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
  }

  publish(channel, data) {
    return this._call('publish', { channel, data }, true);
  }

  presence(channel) {
    return this._call('presence', { channel }).then((r) => ({
      clients: Object.fromEntries(Object.entries(r.presence ?? {}).map(([id, info]) => [id, clientInfo(info)])),
    }));
  }

  presenceStats(channel) {
    return this._call('presence_stats', { channel }).then((r) => ({
      numClients: r.num_clients ?? 0,
      numUsers: r.num_users ?? 0,
    }));
  }

  history(channel, { limit, since, reverse } = {}) {
    const params = { channel };
    if (limit !== undefined) params.limit = limit;
    if (since) params.since = { offset: since.offset ?? 0, epoch: since.epoch ?? '' };
    if (reverse) params.reverse = true;
    return this._call('history', params).then((r) => ({
      publications: (r.publications ?? []).map((pub) => publicationContext(channel, pub)),
      offset: r.offset ?? 0,
      epoch: r.epoch ?? '',
    }));
  }

  rpc(method, data) {
    return this._call('rpc', { method, data }).then((r) => ({ data: r.data }));
  }

  /** An asynchronous message to the server: no reply. Dropped unless connected. */
  send(data) {
    if (!this._ready) return false;
    this._write(JSON.stringify({ send: { data } }));
    return true;
  }

  // --- connection lifecycle ------------------------------------------------------------------

  _log(...args) {
    if (this._options.debug) console.debug('[plexus]', ...args);
  }

  _setState(state) {
    if (this.state === state) return;
    const oldState = this.state;
    this.state = state;
    this._log('state', oldState, '→', state);
    this._emit('state', { oldState, newState: state });
  }

  _clearTimer(name) {
    if (this._timers[name] !== null) this._clock.clearTimeout(this._timers[name]);
    this._timers[name] = null;
  }

  _setTimer(name, ms, fn) {
    this._clearTimer(name);
    this._timers[name] = this._clock.setTimeout(() => {
      this._timers[name] = null;
      fn();
    }, ms);
  }

  _fetchToken(onToken) {
    const epoch = this._epoch;
    let pending;
    try {
      pending = Promise.resolve(this._options.getToken({}));
    } catch (error) {
      pending = Promise.reject(error);
    }
    pending.then((token) => {
      if (epoch !== this._epoch || this.state === 'disconnected') return;
      if (!token) throw new UnauthorizedError('getToken returned no token');
      this._token = token;
      this._needToken = false;
      onToken();
    }).catch((error) => {
      if (epoch !== this._epoch || this.state === 'disconnected') return;
      this._emit('error', { type: 'connectToken', error });
      if (error instanceof UnauthorizedError) this._stop(ClientCode.unauthorized, 'unauthorized');
      else this._reconnect(ClientCode.transportClosed, 'could not get a token');
    });
  }

  _startAttempt() {
    this._epoch++;
    if (this._needToken && this._options.getToken) {
      this._fetchToken(() => this._openTransport());
      return;
    }
    this._openTransport();
  }

  _connectCommand() {
    const params = { name: this._options.name, version: VERSION };
    if (this._token) params.token = this._token;
    if (this._options.data !== undefined) params.data = this._options.data;
    const subs = {};
    for (const [channel, position] of this._serverSubs) {
      if (position.recoverable) subs[channel] = { recover: true, epoch: position.epoch, offset: position.offset };
    }
    if (Object.keys(subs).length > 0) params.subs = subs;
    this._connectId = this._nextId++;
    return JSON.stringify({ id: this._connectId, connect: params });
  }

  _openTransport() {
    const spec = this._transports[this._transportIndex];
    const epoch = ++this._epoch;
    const handlers = {
      message: (text) => { if (epoch === this._epoch) this._onMessage(text); },
      close: ({ code, reason }) => {
        if (epoch !== this._epoch) return;
        this._log('transport closed', code, reason);
        this._connectionLost(code ?? ClientCode.transportClosed, reason || 'transport closed');
      },
    };
    this._ready = false;
    this._replied = false;
    this.transport = spec.transport;
    this._log('opening', spec.transport, spec.endpoint);
    const conn = TRANSPORTS[spec.transport](spec.endpoint, this._options, handlers);
    this._conn = conn;
    this._setTimer('connect', this._options.timeout, () => {
      this._emit('error', { type: 'transport', error: new PlexusError(ErrorCode.timeout, 'connect timeout'), transport: spec.transport });
      this._connectionLost(ClientCode.connectTimeout, 'connect timeout');
    });
    try {
      conn.open(this._connectCommand());
    } catch (error) {
      this._emit('error', { type: 'transport', error, transport: spec.transport });
      queueMicrotask(() => handlers.close({ code: ClientCode.transportClosed, reason: String(error.message) }));
    }
  }

  /** Ends the current connection (if any) and everything bound to it. */
  _teardown(code, reason) {
    const conn = this._conn;
    this._conn = null;
    this._ready = false;
    this._epoch++;
    this._clearTimer('connect');
    this._clearTimer('ping');
    this._clearTimer('refresh');
    this._outbox = [];
    conn?.close();
    for (const [id, call] of this._calls) {
      this._calls.delete(id);
      this._clock.clearTimeout(call.timer);
      call.done(new PlexusError(ErrorCode.connectionClosed, 'connection closed'));
    }
    for (const sub of this._subs.values()) sub._connectionLost(code, reason);
  }

  /** The connection ended (closed, timed out, told to go): reconnect, or stop on 3500+. */
  _connectionLost(code, reason) {
    if (this._conn === null) return;
    const replied = this._replied;
    this._teardown(code, reason);
    if (this.state === 'disconnected') return;
    if (code >= 3500) {
      this._stop(code, reason);
      return;
    }
    let delay;
    if (!replied && !this._transportKnown) {
      // The transport did not work: try the next one at once; back off after a full round.
      this._emit('error', { type: 'transport', error: new PlexusError(code, reason), transport: this.transport });
      this._transportIndex = (this._transportIndex + 1) % this._transports.length;
      if (this._transportIndex !== 0) delay = 0;
    }
    this._reconnect(code, reason, delay);
  }

  _reconnect(code, reason, delay) {
    if (this.state === 'connected') {
      this._setState('connecting');
      this._emit('connecting', { code, reason });
    }
    if (delay === undefined) {
      delay = backoff(this._attempt, this._options.minReconnectDelay, this._options.maxReconnectDelay, this._options.random);
      this._attempt++;
    }
    this._log('reconnect in', delay, 'ms');
    this._setTimer('reconnect', delay, () => this._startAttempt());
  }

  _stop(code, reason) {
    this._teardown(code, reason);
    this._epoch++;
    this._clearTimer('reconnect');
    for (const item of this._queue.filter((queued) => !queued.keep)) this._dequeue(item).reject(new PlexusError(ErrorCode.disconnected, 'client disconnected'));
    this._setState('disconnected');
    this._emit('disconnected', { code, reason });
  }

  // --- incoming ------------------------------------------------------------------------------

  _onMessage(text) {
    if (this._ready) this._armWatchdog();
    for (const line of text.split('\n')) {
      if (line.trim() === '') continue;
      let message;
      try {
        message = JSON.parse(line);
      } catch {
        this._emit('error', { type: 'protocol', error: new PlexusError(ErrorCode.badReply, `not JSON: ${line.slice(0, 100)}`) });
        this._connectionLost(ClientCode.badProtocol, 'bad protocol');
        return;
      }
      if (this._conn === null) return; // a previous line ended the connection
      if (message.id) this._onReply(message);
      else if (message.push) this._onPush(message.push);
      else if (this._ready && this._pong) this._write('{}'); // a server ping
    }
  }

  _onReply(reply) {
    if (reply.id === this._connectId && !this._ready) {
      this._onConnectReply(reply);
      return;
    }
    const call = this._calls.get(reply.id);
    if (!call) return;
    this._calls.delete(reply.id);
    this._clock.clearTimeout(call.timer);
    if (reply.error) call.done(new PlexusError(reply.error.code ?? 100, reply.error.message ?? '', reply.error.temporary === true));
    else call.done(null, reply[call.method] ?? {});
  }

  _onConnectReply(reply) {
    this._clearTimer('connect');
    this._replied = true;
    this._transportKnown = true; // the server answered over it
    if (reply.error) {
      const error = new PlexusError(reply.error.code ?? 100, reply.error.message ?? '', reply.error.temporary === true);
      this._emit('error', { type: 'connect', error });
      if (error.code === 109) {
        if (!this._options.getToken) {
          this._stop(ClientCode.tokenExpired, 'token expired');
          return;
        }
        this._needToken = true;
        this._token = '';
        this._teardown(ClientCode.tokenExpired, 'token expired');
        this._reconnect(ClientCode.tokenExpired, 'token expired');
        return;
      }
      if (isTemporary(error)) {
        this._teardown(error.code, error.message);
        this._reconnect(error.code, error.message);
        return;
      }
      this._stop(error.code, error.message);
      return;
    }
    const result = reply.connect ?? {};
    this._ready = true;
    this._attempt = 0;
    this.client = result.client ?? '';
    this._ids = { session: result.session ?? '', node: result.node ?? '' };
    this._pingInterval = result.ping ?? 0;
    this._pong = result.pong === true;
    this._armWatchdog();
    if (result.expires && this._options.getToken) this._scheduleRefresh(result.ttl ?? 0);

    // Resubscribe first, then what waited offline: the server handles them in this order.
    const serverSubs = result.subs ?? {};
    for (const sub of this._subs.values()) if (sub.state === 'subscribing') sub._sendSubscribe();
    for (const item of [...this._queue]) {
      this._dequeue(item);
      this._sendCall(item.method, item.params).then(item.resolve, item.reject);
    }
    this._setState('connected');
    this._emit('connected', { client: this.client, transport: this.transport, data: result.data });
    const known = this._serverSubs;
    this._serverSubs = new Map();
    for (const [channel, subResult] of Object.entries(serverSubs)) this._serverSubscribed(channel, subResult, known.get(channel));
  }

  _armWatchdog() {
    if (!this._pingInterval) return;
    this._setTimer('ping', this._pingInterval * 1000 + this._options.pingMargin, () => {
      this._log('no ping from the server');
      this._connectionLost(ClientCode.noPing, 'no ping');
    });
  }

  _scheduleRefresh(ttl) {
    const ms = ttl * 1000;
    this._setTimer('refresh', Math.max(0, ms - Math.min(10000, ms / 5)), () => this._refresh());
  }

  _refresh() {
    const epoch = this._epoch;
    const retry = (error) => {
      if (epoch !== this._epoch) return;
      this._emit('error', { type: 'refresh', error });
      this._setTimer('refresh', backoff(1, this._options.minReconnectDelay, this._options.maxReconnectDelay, this._options.random) + 1000, () => this._refresh());
    };
    Promise.resolve().then(() => this._options.getToken({})).then((token) => {
      if (epoch !== this._epoch) return;
      if (!token) throw new UnauthorizedError('getToken returned no token');
      this._token = token;
      return this._sendCall('refresh', { token }).then((result) => {
        if (epoch === this._epoch && result.expires) this._scheduleRefresh(result.ttl ?? 0);
      });
    }).catch((error) => {
      if (epoch !== this._epoch) return;
      if (error instanceof UnauthorizedError) {
        this._emit('error', { type: 'refresh', error });
        this._stop(ClientCode.unauthorized, 'unauthorized');
      } else {
        retry(error);
      }
    });
  }

  _onPush(push) {
    const channel = push.channel ?? '';
    const sub = this._subs.get(channel);
    if (push.pub) {
      if (sub) sub._onPublication(push.pub);
      else this._serverPublication(channel, push.pub);
    } else if (push.join || push.leave) {
      const event = push.join ? 'join' : 'leave';
      const ctx = { channel, info: clientInfo((push.join ?? push.leave).info ?? {}) };
      if (sub) { if (sub.state === 'subscribed') sub._emit(event, ctx); } else this._emit(event, ctx);
    } else if (push.unsubscribe) {
      const { code = 0, reason = '' } = push.unsubscribe;
      if (sub) sub._serverUnsubscribe(code, reason);
      else if (this._serverSubs.delete(channel)) this._emit('unsubscribed', { channel, code, reason });
    } else if (push.subscribe) {
      if (!sub) this._serverSubscribed(channel, push.subscribe, undefined);
    } else if (push.message) {
      this._emit('message', { data: push.message.data });
    } else if (push.disconnect) {
      const { code = ClientCode.transportClosed, reason = '' } = push.disconnect;
      this._connectionLost(code, reason);
    } else if (push.refresh) {
      if (push.refresh.expires && this._options.getToken) this._scheduleRefresh(push.refresh.ttl ?? 0);
      else this._clearTimer('refresh');
    }
  }

  _serverSubscribed(channel, result, previous) {
    const position = { recoverable: !!result.recoverable, epoch: result.epoch ?? '', offset: 0 };
    if (previous && result.recovered && previous.epoch === position.epoch) position.offset = previous.offset;
    this._serverSubs.set(channel, position);
    this._emit('subscribed', {
      channel,
      recoverable: position.recoverable,
      positioned: !!result.positioned,
      wasRecovering: !!result.was_recovering,
      recovered: !!result.recovered,
      position: { offset: result.offset ?? 0, epoch: position.epoch },
      data: result.data,
    });
    for (const pub of result.publications ?? []) this._serverPublication(channel, pub);
    position.offset = Math.max(position.offset, result.offset ?? 0);
  }

  _serverPublication(channel, pub) {
    const position = this._serverSubs.get(channel);
    if (!position) return; // not (or no longer) subscribed
    const offset = pub.offset ?? 0;
    if (offset > 0) {
      if (offset <= position.offset) return; // seen already
      position.offset = offset;
    }
    this._emit('publication', publicationContext(channel, pub));
  }

  // --- outgoing ------------------------------------------------------------------------------

  /** Frames written in one tick go out as one message, joined by '\n'. */
  _write(frame) {
    this._outbox.push(frame);
    if (this._outbox.length > 1) return;
    const conn = this._conn;
    queueMicrotask(() => {
      if (this._conn !== conn || this._outbox.length === 0) return;
      const frames = this._outbox.join('\n');
      this._outbox = [];
      try {
        conn.send(frames, this._ids);
      } catch (error) {
        this._emit('error', { type: 'transport', error, transport: this.transport });
        this._connectionLost(ClientCode.transportClosed, 'send failed');
      }
    });
  }

  /**
   * Sends a command on the current connection; `done(error, result)` runs when its reply
   * arrives (synchronously, in the order of the server's messages), it times out, or the
   * connection ends.
   */
  _command(method, params, done) {
    if (!this._ready) {
      done(new PlexusError(ErrorCode.connectionClosed, 'not connected'));
      return;
    }
    const id = this._nextId++;
    const timer = this._clock.setTimeout(() => {
      this._calls.delete(id);
      done(new PlexusError(ErrorCode.timeout, 'timeout'));
    }, this._options.timeout);
    this._calls.set(id, { method, done, timer });
    this._write(JSON.stringify({ id, [method]: params }));
  }

  /** `_command` as a promise. */
  _sendCall(method, params) {
    return new Promise((resolve, reject) => {
      this._command(method, params, (error, result) => (error ? reject(error) : resolve(result)));
    });
  }

  /**
   * A command of the public API: sent now when connected, otherwise queued (at most maxQueued)
   * until the next connect. `keep` (publish) waits for as long as it takes; other commands
   * time out after `timeout` ms in the queue too.
   */
  _call(method, params, keep = false) {
    if (this._ready) return this._sendCall(method, params);
    return new Promise((resolve, reject) => {
      if (this._queue.length >= this._options.maxQueued) {
        reject(new PlexusError(ErrorCode.queueFull, `offline queue full: ${this._options.maxQueued} commands wait for a connection already`));
        return;
      }
      if (!keep && this.state === 'disconnected') {
        reject(new PlexusError(ErrorCode.disconnected, 'client disconnected: call connect() first'));
        return;
      }
      const item = { method, params, resolve, reject, keep, timer: null };
      if (!keep) {
        item.timer = this._clock.setTimeout(() => {
          this._dequeue(item);
          reject(new PlexusError(ErrorCode.timeout, 'timeout'));
        }, this._options.timeout);
      }
      this._queue.push(item);
    });
  }

  _dequeue(item) {
    const at = this._queue.indexOf(item);
    if (at >= 0) this._queue.splice(at, 1);
    if (item.timer !== null) this._clock.clearTimeout(item.timer);
    return item;
  }
}

/**
 * A client-side subscription. States: 'unsubscribed' → subscribe() → 'subscribing' →
 * 'subscribed'; a lost connection goes back to 'subscribing' and resubscribes with recovery.
 */
export class Subscription extends Emitter {
  constructor(client, channel, options = {}) {
    super();
    this.channel = channel;
    /** 'unsubscribed' | 'subscribing' | 'subscribed' */
    this.state = 'unsubscribed';
    this._client = client;
    this._options = { token: '', getToken: null, joinLeave: false, recover: true, data: undefined, delta: '', tagsFilter: null, ...options };
    this._delta = false; // the server agreed to send deltas
    this._deltaBase = null; // the bytes of the last publication, which the next delta applies to
    this._token = this._options.token || '';
    this._epoch = 0; // bumped on every state change: stale replies and tokens check it
    this._attempt = 0;
    this._inflight = false;
    this._buffered = [];
    this._timers = { retry: null, refresh: null };
    this._clearPosition();
  }

  subscribe() {
    if (this.state !== 'unsubscribed') return;
    this._attempt = 0;
    this._setState('subscribing');
    if (this._client._ready) this._sendSubscribe();
  }

  unsubscribe() {
    if (this.state === 'unsubscribed') return;
    this._toUnsubscribed(ClientCode.unsubscribeCalled, 'unsubscribe called', true);
  }

  publish(data) {
    return this._client.publish(this.channel, data);
  }

  presence() {
    return this._client.presence(this.channel);
  }

  presenceStats() {
    return this._client.presenceStats(this.channel);
  }

  history(options) {
    return this._client.history(this.channel, options);
  }

  /** The last position seen (what a resubscribe recovers from), or null. */
  get position() {
    return this._recoverable ? { offset: this._offset, epoch: this._streamEpoch } : null;
  }

  _setState(state) {
    if (this.state === state) return;
    const oldState = this.state;
    this.state = state;
    this._epoch++;
    this._emit('state', { channel: this.channel, oldState, newState: state });
  }

  _clearPosition() {
    this._recoverable = false;
    this._streamEpoch = '';
    this._offset = 0;
  }

  _clearTimers() {
    for (const name of Object.keys(this._timers)) {
      if (this._timers[name] !== null) this._client._clock.clearTimeout(this._timers[name]);
      this._timers[name] = null;
    }
  }

  _toUnsubscribed(code, reason, tellServer) {
    const wasOnServer = this._inflight || this.state === 'subscribed';
    this._clearTimers();
    this._inflight = false;
    this._buffered = [];
    this._clearPosition();
    this._setState('unsubscribed');
    this._emit('unsubscribed', { channel: this.channel, code, reason });
    if (tellServer && wasOnServer && this._client._ready) {
      this._client._sendCall('unsubscribe', { channel: this.channel }).catch(() => {});
    }
  }

  /** Called by the client when its connection ends. */
  _connectionLost(code, reason) {
    this._inflight = false;
    this._buffered = [];
    if (this._timers.refresh !== null) this._client._clock.clearTimeout(this._timers.refresh);
    this._timers.refresh = null;
    if (this.state === 'subscribed') {
      this._setState('subscribing');
      this._emit('subscribing', { channel: this.channel, code, reason });
    } else {
      this._epoch++;
    }
  }

  _sendSubscribe() {
    const client = this._client;
    const epoch = ++this._epoch;
    const connEpoch = client._epoch;
    if (!this._token && this._options.getToken) {
      this._fetchToken(() => this._sendSubscribe());
      return;
    }
    const params = { channel: this.channel };
    if (this._token) params.token = this._token;
    if (this._options.data !== undefined) params.data = this._options.data;
    if (this._options.joinLeave) params.join_leave = true;
    if (this._options.delta) params.delta = this._options.delta;
    if (this._options.tagsFilter) params.tf = this._options.tagsFilter;
    if (this._options.recover && this._recoverable) {
      params.recover = true;
      params.epoch = this._streamEpoch;
      params.offset = this._offset;
    }
    this._inflight = true;
    this._buffered = [];
    client._command('subscribe', params, (error, result) => {
      if (epoch !== this._epoch) return;
      this._inflight = false;
      if (!error) {
        this._onSubscribed(result);
        return;
      }
      if (error.code === ErrorCode.timeout && client._epoch === connEpoch) {
        client._connectionLost(ClientCode.subscribeTimeout, 'subscribe timeout');
        return;
      }
      if (error.code === ErrorCode.connectionClosed) return; // resubscribed on the next connect
      this._emit('error', { channel: this.channel, type: 'subscribe', error });
      if (error.code === 109 && this._options.getToken) {
        this._token = '';
        this._retry();
      } else if (isTemporary(error)) {
        this._retry();
      } else {
        this._toUnsubscribed(error.code, error.message, false);
      }
    });
  }

  _fetchToken(onToken) {
    const epoch = this._epoch;
    const connEpoch = this._client._epoch;
    Promise.resolve().then(() => this._options.getToken({ channel: this.channel })).then((token) => {
      if (epoch !== this._epoch || connEpoch !== this._client._epoch) return;
      if (!token) throw new UnauthorizedError('getToken returned no token');
      this._token = token;
      onToken();
    }).catch((error) => {
      if (epoch !== this._epoch || connEpoch !== this._client._epoch) return;
      this._emit('error', { channel: this.channel, type: 'subscribeToken', error });
      if (error instanceof UnauthorizedError) this._toUnsubscribed(ClientCode.unauthorized, 'unauthorized', true);
      else this._retry();
    });
  }

  _retry() {
    const { minReconnectDelay, maxReconnectDelay, random } = this._client._options;
    const delay = backoff(this._attempt++, minReconnectDelay, maxReconnectDelay, random);
    const epoch = this._epoch;
    this._timers.retry = this._client._clock.setTimeout(() => {
      this._timers.retry = null;
      if (epoch === this._epoch && this.state === 'subscribing' && this._client._ready) this._sendSubscribe();
    }, delay);
  }

  _onSubscribed(result) {
    this._attempt = 0;
    const wasRecovering = !!result.was_recovering;
    const recovered = !!result.recovered;
    const streamEpoch = result.epoch ?? '';
    // Without complete recovery the old offset means nothing any more (maybe another epoch).
    if (!recovered || streamEpoch !== this._streamEpoch) this._offset = 0;
    this._recoverable = !!result.recoverable;
    this._streamEpoch = streamEpoch;
    this._delta = !!result.delta;
    this._deltaBase = null; // the server makes deltas only from what this reply or later sends
    const buffered = this._buffered;
    this._buffered = [];
    this._setState('subscribed');
    const epoch = this._epoch;
    this._emit('subscribed', {
      channel: this.channel,
      recoverable: this._recoverable,
      positioned: !!result.positioned,
      wasRecovering,
      recovered,
      position: { offset: result.offset ?? 0, epoch: streamEpoch },
      data: result.data,
    });
    for (const pub of result.publications ?? []) {
      if (epoch !== this._epoch) return; // a listener unsubscribed
      this._deliver(pub);
    }
    this._offset = Math.max(this._offset, result.offset ?? 0);
    for (const pub of buffered) {
      if (epoch !== this._epoch) return;
      this._deliver(pub);
    }
    if (result.expires && this._options.getToken) this._scheduleRefresh(result.ttl ?? 0);
  }

  _onPublication(pub) {
    if (this.state === 'subscribing' && this._inflight) this._buffered.push(pub);
    else if (this.state === 'subscribed') this._deliver(pub);
  }

  _deliver(pub) {
    const offset = pub.offset ?? 0;
    if (offset > 0 && offset <= this._offset) return; // a duplicate
    if (this._delta) {
      // Data is a JSON string: the publication's JSON, or a delta from the last one's bytes.
      try {
        const bytes = pub.delta
          ? applyFossilDelta(this._deltaBase ?? new Uint8Array(0), utf8.encode(pub.data))
          : utf8.encode(pub.data);
        pub = { ...pub, data: JSON.parse(utf8decoder.decode(bytes)) };
        delete pub.delta;
        this._deltaBase = bytes;
      } catch (error) {
        // Not rebuilt: subscribe again from the last position; the server then sends whole.
        this._emit('error', { channel: this.channel, type: 'delta', error });
        this._client._sendCall('unsubscribe', { channel: this.channel }).catch(() => {});
        this._serverUnsubscribe(2500, 'delta not applied');
        return;
      }
    }
    if (offset > 0) this._offset = offset;
    this._emit('publication', publicationContext(this.channel, pub));
  }

  _serverUnsubscribe(code, reason) {
    if (this.state === 'unsubscribed') return;
    if (code >= 2500 && code < 3000) {
      // Temporary: back to subscribing, recovering from the last position.
      this._inflight = false;
      this._buffered = [];
      if (this.state === 'subscribed') {
        this._setState('subscribing');
        this._emit('subscribing', { channel: this.channel, code, reason });
      }
      if (this._client._ready) this._sendSubscribe();
      return;
    }
    this._toUnsubscribed(code, reason, false);
  }

  _scheduleRefresh(ttl) {
    const ms = ttl * 1000;
    const epoch = this._epoch;
    const clock = this._client._clock;
    if (this._timers.refresh !== null) clock.clearTimeout(this._timers.refresh);
    this._timers.refresh = clock.setTimeout(() => {
      this._timers.refresh = null;
      if (epoch !== this._epoch) return;
      Promise.resolve().then(() => this._options.getToken({ channel: this.channel })).then((token) => {
        if (epoch !== this._epoch) return;
        if (!token) throw new UnauthorizedError('getToken returned no token');
        this._token = token;
        return this._client._sendCall('sub_refresh', { channel: this.channel, token }).then((r) => {
          if (epoch === this._epoch && r.expires) this._scheduleRefresh(r.ttl ?? 0);
        });
      }).catch((error) => {
        if (epoch !== this._epoch) return;
        this._emit('error', { channel: this.channel, type: 'refresh', error });
        if (error instanceof UnauthorizedError) this._toUnsubscribed(ClientCode.unauthorized, 'unauthorized', true);
        else this._scheduleRefresh(Math.max(1, ttl / 2)); // try again before it runs out
      });
    }, Math.max(0, ms - Math.min(10000, ms / 5)));
  }
}

const utf8 = new TextEncoder();
const utf8decoder = new TextDecoder('utf-8', { fatal: true });

/** Values of the base-64 digits of Fossil deltas: 0-9 A-Z _ a-z ~. */
const FOSSIL_DIGITS = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~';
const FOSSIL_VALUES = new Map([...FOSSIL_DIGITS].map((digit, value) => [digit.charCodeAt(0), value]));

/** Fossil's checksum: the sum (mod 2^32) of the bytes as big-endian 32-bit words, zero-padded. */
function fossilChecksum(bytes) {
  let sum = 0;
  for (let i = 0; i < bytes.length; i += 4) {
    const word = ((bytes[i] << 24) | ((bytes[i + 1] ?? 0) << 16) | ((bytes[i + 2] ?? 0) << 8) | (bytes[i + 3] ?? 0)) >>> 0;
    sum = (sum + word) >>> 0;
  }
  return sum;
}

/**
 * The target a Fossil delta describes, from the source it was made from (both Uint8Array):
 * `LEN\n`, then copies `CNT@OFS,` and inserts `CNT:BYTES`, then `CHECKSUM;`. Throws on a delta
 * that does not apply to this source.
 */
export function applyFossilDelta(source, delta) {
  let at = 0;
  const int = () => {
    let value = 0;
    const start = at;
    while (at < delta.length && FOSSIL_VALUES.has(delta[at])) value = value * 64 + FOSSIL_VALUES.get(delta[at++]);
    if (at === start || value > 0xffffffff) throw new Error('bad delta: a number');
    return value;
  };
  const char = () => (at < delta.length ? String.fromCharCode(delta[at++]) : '');
  const length = int();
  if (char() !== '\n') throw new Error('bad delta: no length');
  const out = new Uint8Array(length);
  let written = 0;
  for (;;) {
    const count = int();
    const op = char();
    if (op === '@') {
      const offset = int();
      if (char() !== ',') throw new Error('bad delta: a copy');
      if (offset + count > source.length || written + count > length) throw new Error('bad delta: a copy out of range');
      out.set(source.subarray(offset, offset + count), written);
      written += count;
    } else if (op === ':') {
      if (at + count > delta.length || written + count > length) throw new Error('bad delta: an insert out of range');
      out.set(delta.subarray(at, at + count), written);
      at += count;
      written += count;
    } else if (op === ';') {
      if (written !== length) throw new Error('bad delta: wrong length');
      if (count !== fossilChecksum(out)) throw new Error('bad delta: wrong checksum');
      return out;
    } else {
      throw new Error('bad delta: unknown command');
    }
  }
}

export default Plexus;
