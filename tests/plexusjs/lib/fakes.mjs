// Test doubles for plexus.js: a clock whose time moves only when a test says so, a WebSocket
// class the test drives from the server's side, and helpers to bring a client to 'connected'.

import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const PLEXUS_JS = path.resolve(here, '../../../crates/plexus-server/static/plexus.js');

/** Lets pending promise callbacks (and microtasks) run. */
export const flush = () => new Promise((resolve) => setImmediate(resolve));

/** The clock plexus.js takes as `clock`: timers run only in advance() / runNext(). */
export class FakeClock {
  constructor(start = 1_000_000) {
    this.time = start;
    this.timers = new Map();
    this.nextId = 1;
    this.now = () => this.time;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { id, fn, at: this.time + Math.max(0, ms ?? 0), ms });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
  }

  _earliest(until = Infinity) {
    let best = null;
    for (const timer of this.timers.values()) {
      if (timer.at > until) continue;
      if (!best || timer.at < best.at || (timer.at === best.at && timer.id < best.id)) best = timer;
    }
    return best;
  }

  /** Moves time forward by `ms`, running every timer due on the way, in order. */
  async advance(ms) {
    const end = this.time + ms;
    for (;;) {
      await flush();
      const timer = this._earliest(end);
      if (!timer) break;
      this.timers.delete(timer.id);
      this.time = timer.at;
      timer.fn();
    }
    this.time = end;
    await flush();
  }

  /** Runs the next timer (moving time to it) and returns it, or null if none is set. */
  async runNext() {
    await flush();
    const timer = this._earliest();
    if (!timer) return null;
    this.timers.delete(timer.id);
    this.time = timer.at;
    timer.fn();
    await flush();
    return timer;
  }
}

/**
 * A fresh fake WebSocket class (its own `sockets` list). The client calls the constructor,
 * send() and close(); the test plays the server with open(), receive() and serverClose().
 */
export function fakeWebSocket(clock) {
  const sockets = [];
  class FakeWebSocket {
    static sockets = sockets;

    constructor(url) {
      this.url = url;
      this.sent = [];
      this.readyState = 0;
      this.closedByClient = false;
      this.createdAt = clock?.now();
      sockets.push(this);
    }

    send(data) {
      if (this.readyState !== 1) throw new Error('send on a socket that is not open');
      this.sent.push(data);
    }

    close() {
      this.closedByClient = true;
      this.readyState = 3;
    }

    // --- the server's side ---

    open() {
      this.readyState = 1;
      this.onopen?.({});
    }

    /** One WebSocket message holding these replies/pushes, joined by '\n'. */
    receive(...messages) {
      const text = messages.map((m) => (typeof m === 'string' ? m : JSON.stringify(m))).join('\n');
      this.onmessage?.({ data: text });
    }

    serverClose(code, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }

    /** Every command the client sent, parsed, in order. */
    commands() {
      return this.sent.flatMap((frame) => frame.split('\n')).map((line) => JSON.parse(line));
    }

    /** The last command with this method. */
    last(method) {
      const found = this.commands().filter((c) => method in c);
      assert.ok(found.length > 0, `no ${method} command sent; sent: ${JSON.stringify(this.sent)}`);
      return found[found.length - 1];
    }

    /** Replies to the last command of `method` with `result`. */
    reply(method, result = {}) {
      const command = this.last(method);
      this.receive({ id: command.id, [method]: result });
      return command;
    }
  }
  return FakeWebSocket;
}

/**
 * A client on a fake clock and fake WebSocket, with its events recorded in `events` as
 * [name, ctx] pairs.
 */
export async function makeClient(Plexus, options = {}) {
  const clock = options.clock ?? new FakeClock();
  const WebSocket = fakeWebSocket(clock);
  const client = new Plexus('ws://plexus.test/connection/websocket', {
    websocket: WebSocket,
    clock,
    ...options,
  });
  const events = [];
  for (const name of ['state', 'connecting', 'connected', 'disconnected', 'error', 'publication', 'message']) {
    client.on(name, (ctx) => events.push([name, ctx]));
  }
  return { client, clock, WebSocket, sockets: WebSocket.sockets, events };
}

/** Opens the newest socket and answers its connect command; returns the socket. */
export async function acceptConnect(sockets, result = {}) {
  await flush();
  const socket = sockets[sockets.length - 1];
  if (socket.readyState === 0) socket.open();
  socket.reply('connect', { client: `client-${sockets.length}`, version: '0.1.0', ping: 25, pong: true, ...result });
  await flush();
  return socket;
}
