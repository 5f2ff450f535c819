// The official centrifuge-js SDK with no token at all: the server asks the application's
// backend (a Node HTTP server of the test's own) who the client is, from the cookie of its
// WebSocket upgrade (connect proxy), and whether it may subscribe (subscribe proxy).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import WebSocket from 'ws';
import { client, once, room, setup, watch } from './lib/harness.mjs';

const FILE = 'proxy';

/** The backend: /connect knows the cookie `session=ann`; /subscribe lets `team:*` in. */
async function backend() {
  const calls = [];
  const server = http.createServer((request, response) => {
    let body = '';
    request.on('data', (chunk) => { body += chunk; });
    request.on('end', () => {
      const call = JSON.parse(body);
      calls.push({ path: request.url, call, cookie: request.headers.cookie });
      let answer;
      if (request.url === '/connect') {
        answer = request.headers.cookie === 'session=ann'
          ? { result: { user: 'ann', info: { name: 'Ann' }, data: { welcome: 'Ann' } } }
          : { error: { code: 101, message: 'unauthorized' } };
      } else if (request.url === '/subscribe') {
        answer = call.channel.startsWith('team:') && call.user === 'ann'
          ? { result: { data: { members: 1 } } }
          : { error: { code: 103, message: 'permission denied' } };
      }
      response.writeHead(200, { 'Content-Type': 'application/json' });
      response.end(JSON.stringify(answer));
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, calls, close: () => server.close() };
}

/** A `ws` WebSocket that sends `cookie` with its upgrade, as a browser would. */
function withCookie(cookie) {
  return class CookieWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols, { headers: { Cookie: cookie } });
    }
  };
}

test('a client without a token is who the backend says, from its cookie', async (t) => {
  const app = await backend();
  t.after(() => app.close());
  const namespaces = `[[namespaces]]\nname = "team"\nproxy_subscribe = true\npresence = true\n`;
  const { recorder, server } = await setup(t, FILE, {
    args: [
      '--connect-proxy-url', `${app.url}/connect`,
      '--subscribe-proxy-url', `${app.url}/subscribe`,
      '--proxy-http-headers', 'Cookie',
    ],
    config: namespaces,
  });

  const ann = client(server, recorder, 'ann', { websocket: withCookie('session=ann') });
  const connected = once(ann, 'connected');
  ann.connect();
  const ctx = await connected;
  assert.deepEqual(ctx.data, { welcome: 'Ann' }, 'the backend\'s data in the connect result');
  assert.equal(app.calls[0].call.client, ctx.client);
  assert.equal(app.calls[0].cookie, 'session=ann');

  const channel = `team:${room('t').split(':')[1]}`;
  const sub = watch(recorder, 'ann', ann.newSubscription(channel));
  const subscribed = once(sub, 'subscribed');
  sub.subscribe();
  const subCtx = await subscribed;
  assert.deepEqual(subCtx.data, { members: 1 });
  const presence = await sub.presence();
  const me = presence.clients[ctx.client];
  assert.equal(me.user, 'ann', JSON.stringify(presence));
  assert.deepEqual(me.connInfo, { name: 'Ann' });

  // Without the cookie the backend refuses with 101, which the SDK takes as final.
  const stranger = client(server, recorder, 'stranger', { websocket: WebSocket });
  const refused = once(stranger, 'disconnected');
  stranger.connect();
  const end = await refused;
  assert.deepEqual([end.code, end.reason], [101, 'unauthorized']);
  assert.equal(app.calls.filter((c) => c.path === '/connect').length, 2);
});
