// Transport fallback of plexus.js: WebSocket → SSE → HTTP streaming, with fake EventSource and
// fetch; commands over the emulation endpoint.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { PLEXUS_JS, FakeClock, fakeWebSocket, flush } from './lib/fakes.mjs';

const { Plexus } = await import(PLEXUS_JS);

function fakeEventSource() {
  const sources = [];
  return class FakeEventSource {
    static sources = sources;

    constructor(url) {
      this.url = new URL(url);
      this.closed = false;
      sources.push(this);
    }

    close() {
      this.closed = true;
    }

    /** The connect command the client put in the URL. */
    connectCommand() {
      return JSON.parse(this.url.searchParams.get('cf_connect'));
    }

    emit(message) {
      this.onmessage?.({ data: JSON.stringify(message) });
    }

    fail() {
      this.onerror?.({});
    }
  };
}

/** A fetch that records requests; `respond(request)` gives the Response (default 200). */
function fakeFetch(respond = () => new Response(null, { status: 200 })) {
  const requests = [];
  const fetch = async (url, init) => {
    const request = { url: String(url), method: init.method, body: init.body, signal: init.signal };
    requests.push(request);
    return respond(request);
  };
  fetch.requests = requests;
  /** Commands POSTed to the emulation endpoint, with their session and node. */
  fetch.emulated = () => requests
    .filter((r) => r.url.endsWith('/emulation'))
    .map((r) => JSON.parse(r.body))
    .flatMap(({ session, node, data }) => data.split('\n').map((line) => ({ session, node, command: JSON.parse(line) })));
  return fetch;
}

const TRANSPORTS = [
  { transport: 'websocket', endpoint: 'ws://plexus.test/connection/websocket' },
  { transport: 'sse', endpoint: 'http://plexus.test/connection/sse' },
  { transport: 'http_stream', endpoint: 'http://plexus.test/connection/http_stream' },
];

describe('transport fallback', () => {
  test('WebSocket fails → SSE: connect in the URL, commands and pongs POSTed to /emulation; SSE is remembered', async () => {
    const clock = new FakeClock();
    const WebSocket = fakeWebSocket(clock);
    const EventSource = fakeEventSource();
    const fetch = fakeFetch();
    const client = new Plexus(null, { transports: TRANSPORTS, websocket: WebSocket, eventsource: EventSource, fetch, clock });
    const connected = [];
    client.on('connected', (ctx) => connected.push(ctx));
    client.connect();
    WebSocket.sockets[0].serverClose(1006);
    await clock.advance(0); // the next transport is tried at once
    assert.equal(EventSource.sources.length, 1, 'SSE tried at once');
    const source = EventSource.sources[0];
    assert.equal(source.url.origin + source.url.pathname, 'http://plexus.test/connection/sse');
    const connect = source.connectCommand();
    assert.equal(connect.connect.name, 'plexus.js');
    source.emit({ id: connect.id, connect: { client: 'c1', ping: 25, pong: true, session: 'S1', node: 'N1' } });
    assert.equal(client.state, 'connected');
    assert.deepEqual(connected, [{ client: 'c1', transport: 'sse', data: undefined }]);

    const ack = client.publish('chat:x', 'hi');
    source.emit({}); // a server ping
    await flush();
    const sent = fetch.emulated();
    assert.deepEqual(sent.map((s) => [s.session, s.node]), [['S1', 'N1'], ['S1', 'N1']]);
    assert.deepEqual(sent[0].command.publish, { channel: 'chat:x', data: 'hi' });
    assert.deepEqual(sent[1].command, {}, 'the pong');
    source.emit({ id: sent[0].command.id, publish: {} });
    assert.deepEqual(await ack, {});

    // Lost: the next attempt goes straight to SSE, the transport that worked.
    source.fail();
    assert.ok(source.closed);
    while (EventSource.sources.length === 1) await clock.runNext();
    assert.equal(WebSocket.sockets.length, 1, 'no new WebSocket');
    client.disconnect();
  });

  test('a 404 from the emulation endpoint closes the stream and reconnects', async () => {
    const clock = new FakeClock();
    const EventSource = fakeEventSource();
    let status = 200;
    const fetch = fakeFetch(() => new Response(null, { status }));
    const client = new Plexus([TRANSPORTS[1]], { eventsource: EventSource, fetch, clock, emulationEndpoint: 'http://plexus.test/emulation' });
    client.connect();
    const source = EventSource.sources[0];
    source.emit({ id: source.connectCommand().id, connect: { client: 'c1', session: 'S', node: 'N' } });
    status = 404;
    client.publish('chat:x', 1).catch(() => {});
    await flush();
    await flush();
    assert.ok(source.closed);
    assert.equal(client.state, 'connecting');
    while (EventSource.sources.length === 1) await clock.runNext();
    client.disconnect();
  });

  test('WebSocket and SSE fail → HTTP streaming: POST with the connect command, newline-delimited replies', async () => {
    const clock = new FakeClock();
    const WebSocket = fakeWebSocket(clock);
    const EventSource = fakeEventSource();
    const encoder = new TextEncoder();
    let stream;
    const fetch = fakeFetch((request) => {
      if (request.url.endsWith('/connection/http_stream')) {
        const body = new ReadableStream({ start(controller) { stream = controller; } });
        return new Response(body, { status: 200 });
      }
      return new Response(null, { status: 200 });
    });
    const client = new Plexus(null, { transports: TRANSPORTS, websocket: WebSocket, eventsource: EventSource, fetch, clock });
    client.connect();
    WebSocket.sockets[0].serverClose(1006);
    await clock.advance(0); // the next transport is tried at once
    EventSource.sources[0].fail();
    await clock.advance(0);
    const open = fetch.requests.find((r) => r.url.endsWith('/connection/http_stream'));
    assert.equal(open.method, 'POST');
    const connect = JSON.parse(open.body);
    assert.ok(connect.connect);
    // A reply split across chunks, and two lines in one chunk.
    const text = `${JSON.stringify({ id: connect.id, connect: { client: 'c9', session: 'S', node: 'N' } })}\n`;
    stream.enqueue(encoder.encode(text.slice(0, 10)));
    await flush();
    assert.equal(client.state, 'connecting');
    stream.enqueue(encoder.encode(text.slice(10)));
    await flush();
    assert.equal(client.state, 'connected');
    assert.equal(client.transport, 'http_stream');
    const sub = client.newSubscription('chat:x');
    const seen = [];
    sub.on('publication', (ctx) => seen.push(ctx.data));
    sub.subscribe();
    await flush();
    await flush();
    const subscribe = fetch.emulated().find((s) => s.command.subscribe).command;
    stream.enqueue(encoder.encode(
      `${JSON.stringify({ id: subscribe.id, subscribe: { recoverable: true, epoch: 'e', offset: 1 } })}\n${JSON.stringify({ push: { channel: 'chat:x', pub: { data: 'a', offset: 2 } } })}\n`,
    ));
    await flush();
    assert.deepEqual(seen, ['a']);
    // The stream ends: reconnect over HTTP streaming.
    stream.close();
    await flush();
    assert.equal(client.state, 'connecting');
    client.disconnect();
  });

  test('after every transport failed once, the next round backs off', async () => {
    const clock = new FakeClock();
    const WebSocket = fakeWebSocket(clock);
    const EventSource = fakeEventSource();
    const fetch = fakeFetch(() => new Response(null, { status: 503 }));
    const client = new Plexus(null, { transports: TRANSPORTS, websocket: WebSocket, eventsource: EventSource, fetch, clock, random: () => 0.9999999 });
    client.connect();
    WebSocket.sockets[0].serverClose(1006);
    await clock.advance(0); // the next transport is tried at once
    EventSource.sources[0].fail();
    await clock.advance(0);
    await flush();
    assert.equal(WebSocket.sockets.length, 1);
    const failedAt = clock.now();
    while (WebSocket.sockets.length === 1) await clock.runNext();
    assert.equal(WebSocket.sockets[1].createdAt - failedAt, 500);
    client.disconnect();
  });
});
