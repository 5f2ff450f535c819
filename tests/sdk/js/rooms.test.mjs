// One room, every kind of client: the official SDK (channel chat:ROOM), a raw WebSocket on
// /chat/ROOM, a TCP chat client that /joins ROOM, and the server API all see each other's
// messages, converted as docs/protocol.md says.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import WebSocket from 'ws';
import { client, collect, freePort, room, setup, token, until, watch } from './lib/harness.mjs';

const FILE = 'rooms';

/** A TCP chat client collecting lines. */
async function tcpChat(port) {
  const socket = net.connect(port, '127.0.0.1');
  const lines = [];
  let partial = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk) => {
    partial += chunk;
    const parts = partial.split('\n');
    partial = parts.pop();
    lines.push(...parts);
  });
  await new Promise((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject); });
  return { socket, lines, send: (line) => socket.write(`${line}\n`) };
}

test('SDK, raw WebSocket, TCP chat and the API meet in one room', async (t) => {
  const tcpChatPort = await freePort();
  const { recorder, server } = await setup(t, FILE, { tcpChatPort });
  const channel = room('mixed'); // chat:mixed-…
  const name = channel.slice('chat:'.length);

  const sdk = client(server, recorder, 'sdk', { token: token('u1') });
  const sub = watch(recorder, 'sdk', sdk.newSubscription(channel));
  const sdkSeen = collect(sub);
  sdk.connect();
  sub.subscribe();
  await sub.ready(5_000);

  const raw = new WebSocket(`ws://127.0.0.1:${server.port}/chat/${name}`);
  const rawSeen = [];
  raw.on('message', (data, isBinary) => rawSeen.push(isBinary ? [...data] : data.toString()));
  await new Promise((resolve, reject) => { raw.once('open', resolve); raw.once('error', reject); });
  t.after(() => raw.close());

  const tcp = await tcpChat(tcpChatPort);
  t.after(() => tcp.socket.destroy());
  tcp.send('/nick tcpuser');
  tcp.send(`/join ${name}`);
  await until(() => tcp.lines.some((l) => l.includes(`in room ${name}`)), 'the TCP client joined');

  // A raw text message: raw clients get it unchanged (sender included), TCP as a line, the SDK
  // as a JSON string (it is not JSON itself).
  raw.send('hello from raw');
  await until(() => sdkSeen.length >= 1 && rawSeen.length >= 1 && tcp.lines.includes('hello from raw'), 'the raw message everywhere');
  assert.equal(sdkSeen[0].data, 'hello from raw');
  assert.equal(rawSeen[0], 'hello from raw');

  // A TCP line: `NICK: TEXT` for everyone else.
  tcp.send('hi from tcp');
  await until(() => sdkSeen.length >= 2 && rawSeen.length >= 2, 'the TCP line at the SDK and raw clients');
  assert.equal(sdkSeen[1].data, 'tcpuser: hi from tcp');
  assert.equal(rawSeen[1], 'tcpuser: hi from tcp');

  // An SDK publication (JSON): raw and TCP clients get the JSON text.
  await sub.publish({ text: 'from sdk' });
  await until(() => rawSeen.length >= 3 && tcp.lines.includes('{"text":"from sdk"}'), 'the SDK publication at raw and TCP clients');
  assert.equal(rawSeen[2], '{"text":"from sdk"}');

  // The server API.
  await server.publish(channel, { text: 'from api' });
  await until(() => sdkSeen.length >= 4 && rawSeen.length >= 4 && tcp.lines.includes('{"text":"from api"}'), 'the API publication everywhere');
  assert.deepEqual(sdkSeen.map((p) => p.data), ['hello from raw', 'tcpuser: hi from tcp', { text: 'from sdk' }, { text: 'from api' }]);

  // Binary from a raw client: base64 for the SDK, a notice for TCP.
  raw.send(Buffer.from([1, 2, 3]));
  await until(() => sdkSeen.length >= 5 && tcp.lines.includes('[binary message, 3 bytes]'), 'the binary message');
  assert.equal(sdkSeen[4].data, 'AQID');
  assert.deepEqual(rawSeen[4], [1, 2, 3]);

  // Every SDK publication carries consecutive offsets: they are one stream.
  const offsets = sdkSeen.map((p) => p.offset);
  assert.deepEqual(offsets, offsets.map((_, i) => offsets[0] + i));
});
