// The official centrifuge-js SDK over the WebSocket fallbacks: SSE (GET /connection/sse) and HTTP
// streaming (POST /connection/http_stream), with commands through POST /emulation. Each test has
// its own server.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Centrifuge } from 'centrifuge';
import { EventSource } from 'eventsource';
import WebSocket from 'ws';
import { Gate, collect, freePort, once, room, setup, token, until, watch } from './lib/harness.mjs';

const FILE = 'fallback';
const CLOSED = 'http://127.0.0.1:1';

/** `fetch` that records emulation requests and, while the gate is held, dials nothing. */
function recordingFetch(recorder, label, gate) {
  return (url, options = {}) => {
    let target = String(url);
    if (gate?.held && target.includes('/connection/')) {
      recorder.add(label, `stream held back (gate): ${target} not dialled`);
      target = `${CLOSED}/connection/http_stream`;
    } else if (target.endsWith('/emulation')) {
      recorder.add(`${label} >`, JSON.parse(options.body).data);
    } else {
      recorder.add(label, `${options.method ?? 'GET'} ${target}`);
    }
    return fetch(target, options).then((response) => {
      if (target.endsWith('/emulation') && response.status !== 200) {
        recorder.add(label, `emulation answered ${response.status}`);
      }
      return response;
    });
  };
}

/** An EventSource that records what it receives and, while the gate is held, dials nothing. */
function recordingEventSource(recorder, label, gate) {
  return class RecordingEventSource extends EventSource {
    constructor(url, init) {
      const held = gate?.held ?? false;
      super(held ? `${CLOSED}/connection/sse` : url, init);
      recorder.add(label, held ? `sse held back (gate): ${url} not dialled` : `sse ${url}`);
      this.addEventListener('message', (event) => recorder.add(`${label} <`, String(event.data)));
      this.addEventListener('error', () => recorder.add(label, 'sse error or end'));
    }
  };
}

/** A Centrifuge client over `transports` (names, or {transport, endpoint} for any endpoint). */
function emulatedClient(server, recorder, label, transports, options = {}, gate = null) {
  const endpoints = {
    websocket: server.ws,
    sse: `${server.http}/connection/sse`,
    http_stream: `${server.http}/connection/http_stream`,
  };
  const list = transports.map((t) => (typeof t === 'string' ? { transport: t, endpoint: endpoints[t] } : t));
  const centrifuge = new Centrifuge(list, {
    websocket: WebSocket,
    eventsource: recordingEventSource(recorder, label, gate),
    fetch: recordingFetch(recorder, label, gate),
    readableStream: ReadableStream,
    emulationEndpoint: `${server.http}/emulation`,
    name: `sdk-test-${label}`,
    ...options,
  });
  centrifuge.on('state', (ctx) => recorder.add(label, `state ${ctx.oldState} -> ${ctx.newState}`));
  centrifuge.on('connecting', (ctx) => recorder.add(label, `connecting code ${ctx.code} ${ctx.reason}`));
  centrifuge.on('connected', (ctx) => {
    centrifuge.clientId = ctx.client;
    centrifuge.transportName = ctx.transport;
    recorder.add(label, `connected client ${ctx.client} transport ${ctx.transport}`);
  });
  centrifuge.on('disconnected', (ctx) => recorder.add(label, `disconnected code ${ctx.code} ${ctx.reason}`));
  centrifuge.on('error', (ctx) => recorder.add(label, `error ${ctx.type} ${JSON.stringify(ctx.error)}`));
  (recorder.clients ??= []).push(centrifuge);
  return centrifuge;
}

for (const transport of ['sse', 'http_stream']) {
  test(`${transport}: publications both ways, presence, and recovery after /api/disconnect 3011`, async (t) => {
    const { recorder, server } = await setup(t, FILE);
    const channel = room(transport);
    const gate = new Gate();
    const ann = emulatedClient(server, recorder, 'ann', [transport], {
      token: token('u1', { info: { name: 'Ann' } }),
      minReconnectDelay: 200,
      maxReconnectDelay: 1_000,
    }, gate);
    const annSub = watch(recorder, 'ann', ann.newSubscription(channel));
    const annSeen = collect(annSub);
    const subscribedEvents = [];
    annSub.on('subscribed', (ctx) => subscribedEvents.push(ctx));
    // A WebSocket client in the same channel: publications cross transports.
    const bob = emulatedClient(server, recorder, 'bob', ['websocket'], { token: token('u2') });
    const bobSub = watch(recorder, 'bob', bob.newSubscription(channel));
    const bobSeen = collect(bobSub);

    ann.connect();
    bob.connect();
    await ann.ready(5_000);
    await bob.ready(5_000);
    assert.equal(ann.transportName, transport);
    assert.equal(bob.transportName, 'websocket');
    annSub.subscribe();
    bobSub.subscribe();
    await annSub.ready(5_000);
    await bobSub.ready(5_000);

    // From the emulated client, through /emulation, to both.
    await annSub.publish({ text: 'from ann' });
    // From the WebSocket client to both.
    await bobSub.publish({ text: 'from bob' });
    // From the API.
    const fromApi = await server.publish(channel, { text: 'from api' });
    await until(() => annSeen.length >= 3 && bobSeen.length >= 3, 'three publications at both');
    for (const seen of [annSeen, bobSeen]) {
      assert.deepEqual(seen.map((p) => p.data.text), ['from ann', 'from bob', 'from api']);
    }
    assert.equal(bobSeen[0].info?.user, 'u1');
    assert.deepEqual(bobSeen[0].info?.connInfo, { name: 'Ann' });
    assert.equal(annSeen[2].offset, fromApi.offset);

    // Presence over emulation lists both.
    const presence = await annSub.presence();
    assert.deepEqual(Object.values(presence.clients).map((c) => c.user).sort(), ['u1', 'u2']);
    assert.ok(presence.clients[ann.clientId], 'ann is in presence under its client id');

    // The server disconnects ann with a reconnect code; what it misses comes by recovery.
    gate.held = true;
    const connecting = once(ann, 'connecting', { timeout: 5_000 });
    await server.api('disconnect', { user: 'u1', disconnect: { code: 3011, reason: 'force reconnect' } });
    const ctx = await connecting;
    assert.equal(ctx.code, 3011, `connecting context: ${JSON.stringify(ctx)}`);
    assert.equal(ctx.reason, 'force reconnect');
    const missed = [];
    for (let i = 1; i <= 3; i += 1) missed.push(await server.publish(channel, { text: `missed ${i}` }));
    assert.notEqual(ann.state, 'connected');
    const resubscribed = once(annSub, 'subscribed', { timeout: 8_000 });
    gate.held = false;
    const again = await resubscribed;
    assert.equal(again.wasRecovering, true, `subscribed context: ${JSON.stringify(again)}`);
    assert.equal(again.recovered, true, `subscribed context: ${JSON.stringify(again)}`);
    await until(() => annSeen.length >= 6, 'the missed publications', 5_000);
    await new Promise((resolve) => setTimeout(resolve, 300)); // time for a duplicate to show up
    assert.deepEqual(annSeen.map((p) => p.data.text),
      ['from ann', 'from bob', 'from api', 'missed 1', 'missed 2', 'missed 3'], 'in order, none missing, none twice');
    assert.deepEqual(annSeen.slice(3).map((p) => p.offset), missed.map((m) => m.offset));
    assert.equal(subscribedEvents.length, 2);
    assert.equal(ann.transportName, transport, 'reconnected over the same transport');
  });
}

for (const fallback of ['sse', 'http_stream']) {
  test(`without a WebSocket the SDK falls back to ${fallback} by itself`, async (t) => {
    const { recorder, server } = await setup(t, FILE);
    const channel = room(`fallback-${fallback}`);
    const closed = await freePort();
    const transports = [
      { transport: 'websocket', endpoint: `ws://127.0.0.1:${closed}/connection/websocket` },
      fallback,
    ];
    const carl = emulatedClient(server, recorder, 'carl', transports, { token: token('u3') });
    const sub = watch(recorder, 'carl', carl.newSubscription(channel));
    const seen = collect(sub);
    carl.connect();
    await carl.ready(10_000);
    assert.equal(carl.transportName, fallback);
    sub.subscribe();
    await sub.ready(5_000);
    await server.publish(channel, { n: 1 });
    await sub.publish({ n: 2 });
    await until(() => seen.length >= 2, 'both publications');
    assert.deepEqual(seen.map((p) => p.data.n), [1, 2]);
  });
}
