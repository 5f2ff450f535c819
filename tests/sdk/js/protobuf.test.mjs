// The official centrifuge-js SDK in its Protobuf build (`centrifuge/build/protobuf`) against
// Plexus: binary WebSocket frames (subprotocol `centrifuge-protobuf`) and HTTP streaming with
// `application/octet-stream`, side by side with JSON clients in the same channels. Each test has
// its own server.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Centrifuge as ProtobufCentrifuge } from 'centrifuge/build/protobuf';
import WebSocket from 'ws';
import { client, collect, once, room, setup, sleep, token, until, watch } from './lib/harness.mjs';

const FILE = 'protobuf';

const hex = (data) => Buffer.from(data instanceof ArrayBuffer ? new Uint8Array(data) : data).toString('hex');
const text = (bytes) => new TextDecoder().decode(bytes);
const bytes = (string) => new TextEncoder().encode(string);

/**
 * A `ws` WebSocket that records the frames it sends and receives (binary ones in hex), the
 * subprotocol the server chose, and every frame's kind in `kinds`.
 */
function recordingBinarySocket(recorder, label, kinds) {
  return class RecordingBinarySocket extends WebSocket {
    constructor(url, ...rest) {
      super(url, ...rest);
      recorder.add(label, `open ${url} ${JSON.stringify(rest)}`);
      this.addEventListener('open', () => recorder.add(label, `subprotocol ${JSON.stringify(this.protocol)}`));
      this.addEventListener('message', (event) => {
        const binary = typeof event.data !== 'string';
        kinds.push(binary ? 'binary' : 'text');
        recorder.add(`${label} <`, binary ? `binary ${hex(event.data)}` : event.data);
      });
      this.addEventListener('close', (event) => recorder.add(label, `closed: code ${event.code} reason ${JSON.stringify(event.reason)}`));
    }

    send(data, ...rest) {
      recorder.add(`${label} >`, typeof data === 'string' ? data : `binary ${hex(data)}`);
      return super.send(data, ...rest);
    }
  };
}

/** A Protobuf client of `server` over its WebSocket, frames recorded under `label`. */
function protobufClient(server, recorder, label, options = {}, kinds = []) {
  const centrifuge = new ProtobufCentrifuge(server.ws, {
    websocket: recordingBinarySocket(recorder, label, kinds),
    name: `sdk-test-${label}`,
    ...options,
  });
  centrifuge.on('connected', (ctx) => {
    centrifuge.clientId = ctx.client;
    recorder.add(label, `connected client ${ctx.client} transport ${ctx.transport}`);
  });
  centrifuge.on('disconnected', (ctx) => recorder.add(label, `disconnected code ${ctx.code} ${ctx.reason}`));
  centrifuge.on('error', (ctx) => recorder.add(label, `error ${ctx.type} ${JSON.stringify(ctx.error)}`));
  (recorder.clients ??= []).push(centrifuge);
  return centrifuge;
}

test('Protobuf and JSON clients share a channel: binary data passes unchanged, JSON data arrives as its bytes', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const channel = room('pb');
  const kinds = [];
  const ann = protobufClient(server, recorder, 'ann', { token: token('u1', { info: { name: 'Ann' } }) }, kinds);
  const bob = protobufClient(server, recorder, 'bob', { token: token('u2') });
  const jay = client(server, recorder, 'jay', { token: token('u3') });
  const annSub = watch(recorder, 'ann', ann.newSubscription(channel));
  const bobSub = watch(recorder, 'bob', bob.newSubscription(channel));
  const jaySub = watch(recorder, 'jay', jay.newSubscription(channel));
  const [annSeen, bobSeen, jaySeen] = [collect(annSub), collect(bobSub), collect(jaySub)];
  const subscribed = [annSub, bobSub, jaySub].map((sub) => once(sub, 'subscribed'));
  for (const c of [ann, bob, jay]) c.connect();
  for (const c of [ann, bob, jay]) await c.ready(5_000);
  for (const sub of [annSub, bobSub, jaySub]) sub.subscribe();
  const [first] = await Promise.all(subscribed);
  assert.equal(first.recoverable, true);
  assert.ok(first.streamPosition.epoch.length > 0, `a stream position: ${JSON.stringify(first.streamPosition)}`);

  // Bytes that are not text, from a Protobuf client.
  const binary = new Uint8Array([0, 255, 1, 128, 10]);
  await annSub.publish(binary);
  await until(() => annSeen.length >= 1 && bobSeen.length >= 1 && jaySeen.length >= 1, 'the binary publication everywhere');
  assert.deepEqual([...bobSeen[0].data], [...binary], 'a Protobuf subscriber gets the bytes unchanged');
  assert.deepEqual([...annSeen[0].data], [...binary]);
  assert.equal(jaySeen[0].data, Buffer.from(binary).toString('base64'), 'a JSON subscriber gets base64 in a string');
  assert.equal(bobSeen[0].info?.user, 'u1');
  assert.deepEqual(JSON.parse(text(bobSeen[0].info.connInfo)), { name: 'Ann' }, 'conn info is the token\'s JSON, as bytes');

  // JSON from a JSON client and from the API: Protobuf clients get the JSON text as bytes.
  await jaySub.publish({ text: 'from jay' });
  const published = await server.publish(channel, { text: 'from api' });
  await until(() => bobSeen.length >= 3 && jaySeen.length >= 3, 'the JSON publications');
  assert.deepEqual(bobSeen.slice(1).map((p) => JSON.parse(text(p.data))), [{ text: 'from jay' }, { text: 'from api' }]);
  assert.deepEqual(jaySeen.slice(1).map((p) => p.data), [{ text: 'from jay' }, { text: 'from api' }]);
  assert.equal(bobSeen[2].offset, published.offset);
  assert.deepEqual(bobSeen.map((p) => p.offset), jaySeen.map((p) => p.offset), 'the same offsets in both encodings');

  // JSON text from a Protobuf client reaches JSON clients as that JSON value.
  await bobSub.publish(bytes('{"text":"from bob"}'));
  await until(() => jaySeen.length >= 4, 'the Protobuf client\'s JSON');
  assert.deepEqual(jaySeen[3].data, { text: 'from bob' });

  // Presence, presence stats and history through Protobuf.
  const presence = await bobSub.presence();
  assert.deepEqual(Object.values(presence.clients).map((c) => c.user).sort(), ['u1', 'u2', 'u3']);
  assert.deepEqual(await annSub.presenceStats(), { numClients: 3, numUsers: 3 });
  const history = await annSub.history({ limit: 10 });
  assert.equal(history.publications.length, 4);
  assert.deepEqual([...history.publications[0].data], [...binary]);
  assert.deepEqual(JSON.parse(text(history.publications[2].data)), { text: 'from api' });
  assert.equal(history.epoch, first.streamPosition.epoch);

  // An RPC without a backend is refused with error 108 (not available), in Protobuf too.
  await assert.rejects(ann.rpc('anything', bytes('{}')), (error) => error.code === 108);

  // The wire was binary, and the server named the subprotocol.
  assert.ok(kinds.length > 0 && kinds.every((k) => k === 'binary'), `frame kinds: ${kinds}`);
  assert.ok(recorder.lines.some((line) => line.includes('ann subprotocol "centrifuge-protobuf"')), 'the server chose centrifuge-protobuf');
});

test('a Protobuf client answers pings, recovers missed publications by position, and survives a server-side cut', async (t) => {
  const { recorder, server } = await setup(t, FILE, { args: ['--ping-interval', '1s', '--pong-timeout', '1s'] });
  const channel = room('pbrec');
  const ann = protobufClient(server, recorder, 'ann', { token: token('u1'), minReconnectDelay: 100, maxReconnectDelay: 300 });
  const sub = watch(recorder, 'ann', ann.newSubscription(channel));
  const seen = collect(sub);
  ann.connect();
  await ann.ready(5_000);
  const connecting = [];
  ann.on('connecting', (ctx) => connecting.push(ctx.code));
  const firstSubscribed = once(sub, 'subscribed');
  sub.subscribe();
  await firstSubscribed;
  await server.publish(channel, { n: 1 });
  await until(() => seen.length >= 1, 'the first publication');

  // Pings every second, a pong timeout of one: the connection stays up only if pongs come.
  await sleep(3_500);
  assert.deepEqual(connecting, [], 'no reconnect while pings were answered');
  const pings = recorder.lines.filter((line) => line.includes('ann < binary 00')).length;
  const pongs = recorder.lines.filter((line) => line.includes('ann > binary 00')).length;
  assert.ok(pings >= 2 && pongs >= 2, `pings ${pings} and pongs ${pongs} were single zero bytes`);

  // The server cuts the connection (3000-range: reconnect), publications go on meanwhile.
  const resubscribed = once(sub, 'subscribed', { timeout: 10_000 });
  await server.api('disconnect', { user: 'u1', disconnect: { code: 3001, reason: 'test cut' } });
  await server.publish(channel, { n: 2 });
  await server.publish(channel, { n: 3 });
  const again = await resubscribed;
  assert.equal(again.wasRecovering, true);
  assert.equal(again.recovered, true, 'the missed publications were recovered');
  await until(() => seen.length >= 3, 'the missed publications');
  assert.deepEqual(seen.map((p) => JSON.parse(text(p.data)).n), [1, 2, 3]);
  assert.deepEqual(seen.map((p) => p.offset), [1, 2, 3]);
});

test('Protobuf over HTTP streaming: octet-stream in both directions, and the same channel as WebSocket clients', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const channel = room('pbstream');
  const contentTypes = [];
  const emulationTypes = [];
  const recordingFetch = (url, options = {}) => {
    const target = String(url);
    if (target.endsWith('/emulation')) {
      emulationTypes.push(options.headers?.['Content-Type']);
      recorder.add('sam >', `emulation ${hex(options.body)}`);
    } else {
      recorder.add('sam', `${options.method ?? 'GET'} ${target}`);
    }
    return fetch(target, options).then((response) => {
      if (target.includes('/connection/http_stream')) contentTypes.push(response.headers.get('content-type'));
      return response;
    });
  };
  const sam = new ProtobufCentrifuge(
    [{ transport: 'http_stream', endpoint: `${server.http}/connection/http_stream` }],
    { fetch: recordingFetch, emulationEndpoint: `${server.http}/emulation`, token: token('u1'), name: 'sdk-test-sam' },
  );
  (recorder.clients ??= []).push(sam);
  const ws = protobufClient(server, recorder, 'wes', { token: token('u2') });
  const samSub = watch(recorder, 'sam', sam.newSubscription(channel));
  const wesSub = watch(recorder, 'wes', ws.newSubscription(channel));
  const [samSeen, wesSeen] = [collect(samSub), collect(wesSub)];
  const connected = once(sam, 'connected');
  sam.connect();
  ws.connect();
  const ctx = await connected;
  assert.equal(ctx.transport, 'http_stream');
  await ws.ready(5_000);
  const subscribed = [once(samSub, 'subscribed'), once(wesSub, 'subscribed')];
  samSub.subscribe();
  wesSub.subscribe();
  await Promise.all(subscribed);

  const binary = new Uint8Array([1, 2, 3, 0, 250]);
  await samSub.publish(binary);
  await wesSub.publish(bytes('{"from":"wes"}'));
  await until(() => samSeen.length >= 2 && wesSeen.length >= 2, 'both publications at both clients');
  for (const seen of [samSeen, wesSeen]) {
    assert.deepEqual([...seen[0].data], [...binary]);
    assert.deepEqual(JSON.parse(text(seen[1].data)), { from: 'wes' });
  }
  const stats = await samSub.presenceStats();
  assert.deepEqual(stats, { numClients: 2, numUsers: 2 });
  assert.deepEqual(contentTypes, ['application/octet-stream']);
  assert.ok(emulationTypes.length > 0 && emulationTypes.every((type) => type === 'application/octet-stream'), `emulation content types: ${emulationTypes}`);
});

test('bad Protobuf closes only the connection that sent it, with 3501', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const channel = room('pbbad');
  const good = protobufClient(server, recorder, 'good', { token: token('u1') });
  const sub = watch(recorder, 'good', good.newSubscription(channel));
  const seen = collect(sub);
  good.connect();
  await good.ready(5_000);
  const subscribed = once(sub, 'subscribed');
  sub.subscribe();
  await subscribed;

  const bad = new WebSocket(server.ws, 'centrifuge-protobuf');
  await once(bad, 'open');
  assert.equal(bad.protocol, 'centrifuge-protobuf');
  const closed = new Promise((resolve) => bad.on('close', (code, reason) => resolve({ code, reason: String(reason) })));
  // A length of 5 followed by two bytes: not a command.
  bad.send(Buffer.from([5, 8, 1]));
  const { code, reason } = await closed;
  recorder.add('bad', `closed ${code} ${reason}`);
  assert.equal(code, 3501);
  assert.equal(reason, 'bad request');

  await server.publish(channel, { still: 'here' });
  await until(() => seen.length >= 1, 'the good client still gets publications');
  assert.deepEqual(JSON.parse(text(seen[0].data)), { still: 'here' });
});
