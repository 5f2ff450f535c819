// Several Plexus nodes sharing one NATS with JetStream (`--engine nats`), driven by the official
// centrifuge-js SDK: the NATS counterparts of cluster.test.mjs. Delivery, presence and history
// across three nodes; a node SIGKILLed under a client, which reconnects to another node and
// recovers; and a NATS outage, after which nothing may be missing without the client being told.
//
// Every test uses a unique `--nats-prefix`. The first two run on the shared NATS
// (127.0.0.1:4222) and delete their streams from it afterwards (`{prefix}_history`,
// `{prefix}_presence`, `KV_{prefix}_meta`: with the `nats` CLI when installed, else through the
// JetStream API over a plain NATS connection). The outage test runs its own `nats-server` child
// on a free port with a storage folder of its own; the shared NATS is never stopped.
//
// Skipped when no `nats-server` binary is installed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { API_KEY, Proxy, Recorder, Server, allReady, client, closeAll, collect, freePort, fullHistory, once, readyStatus, room, sleep, token, tryPublish, until, watch } from './lib/harness.mjs';

const FILE = 'cluster-nats';
const SHARED_NATS = 'nats://127.0.0.1:4222';
const SHARED_NATS_PORT = 4222;
const NATS_SERVER = '/usr/sbin/nats-server';

/** The nats-server binary: on PATH, else the Debian location; null when there is none. */
function natsServerBinary() {
  for (const candidate of ['nats-server', NATS_SERVER]) {
    if (spawnSync(candidate, ['--version'], { encoding: 'utf8' }).status === 0) return candidate;
  }
  return null;
}
const natsServer = natsServerBinary();
const natsCli = spawnSync('nats', ['--version'], { encoding: 'utf8' }).status === 0;
const SKIP = natsServer ? false : 'no nats-server binary installed';

/** A prefix no other run uses (letters, digits and '-', as --nats-prefix wants). */
function uniquePrefix(what) {
  return `plexus-sdk-${what}-${process.pid}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

/**
 * One request over a fresh plain NATS connection on `port` (no library: the text protocol),
 * resolving with the reply's payload, or null on failure or after `timeout` ms.
 */
function natsRequest(port, subject, payload = '', timeout = 2_000) {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    const inbox = `_INBOX.sdk${Math.random().toString(36).slice(2)}`;
    let buffer = '';
    let sent = false;
    const done = (value) => { socket.destroy(); resolve(value); };
    socket.setTimeout(timeout, () => done(null));
    socket.once('error', () => done(null));
    socket.on('data', (chunk) => {
      buffer += chunk;
      if (!sent && buffer.includes('\r\n')) {
        sent = true;
        const body = Buffer.from(payload);
        socket.write(`CONNECT {"verbose":false,"pedantic":false}\r\nSUB ${inbox} 1\r\nPUB ${subject} ${inbox} ${body.length}\r\n`);
        socket.write(body);
        socket.write('\r\n');
      }
      const at = buffer.indexOf(`MSG ${inbox} `);
      if (at < 0) return;
      const headEnd = buffer.indexOf('\r\n', at);
      if (headEnd < 0) return;
      const size = Number(buffer.slice(at, headEnd).split(' ').at(-1));
      const body = buffer.slice(headEnd + 2);
      if (Buffer.byteLength(body) >= size) done(Buffer.from(body).subarray(0, size).toString());
    });
  });
}

/** Whether a NATS server greets on `port` (its INFO line). */
function natsUp(port, timeout = 500) {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    const done = (ok) => { socket.destroy(); resolve(ok); };
    socket.setTimeout(timeout, () => done(false));
    socket.once('error', () => done(false));
    socket.on('data', (chunk) => done(String(chunk).startsWith('INFO')));
  });
}

/** Deletes the streams of `prefix` from the NATS on `port` (best effort); says what it did. */
async function dropStreams(recorder, port, prefix) {
  for (const stream of [`${prefix}_history`, `${prefix}_presence`, `KV_${prefix}_meta`]) {
    if (natsCli) {
      const run = spawnSync('nats', ['--server', `nats://127.0.0.1:${port}`, 'stream', 'rm', '-f', stream], { encoding: 'utf8' });
      recorder.add('cleanup', `nats stream rm ${stream}: ${run.status} ${(run.stdout + run.stderr).trim()}`);
    } else {
      const reply = await natsRequest(port, `$JS.API.STREAM.DELETE.${stream}`);
      recorder.add('cleanup', `$JS.API.STREAM.DELETE.${stream}: ${reply ?? 'no reply'}`);
    }
  }
}

/** A `nats-server` child with JetStream, on its own port and storage folder. */
class NatsChild {
  constructor(recorder, port, storeDir) {
    Object.assign(this, { recorder, port, storeDir, child: null, exited: null });
    this.url = `nats://127.0.0.1:${port}`;
  }

  async start() {
    const args = ['-a', '127.0.0.1', '-p', String(this.port), '-js', '-sd', this.storeDir];
    this.recorder.add('nats', `$ ${natsServer} ${args.join(' ')}`);
    const child = spawn(natsServer, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    child.stdout.on('data', (chunk) => this.recorder.add('nats:out', chunk));
    child.stderr.on('data', (chunk) => this.recorder.add('nats:err', chunk));
    this.exited = new Promise((resolve) => {
      child.on('exit', (code, signal) => {
        this.recorder.add('nats', `exited: code ${code} signal ${signal}`);
        resolve({ code, signal });
      });
      child.on('error', (error) => {
        this.recorder.add('nats', `spawn error ${error.message}`);
        resolve({ error });
      });
    });
    await until(async () => {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`nats-server on ${this.port} exited at start`);
      return natsUp(this.port);
    }, `nats-server on port ${this.port}`, 5_000);
  }

  async kill() {
    const { child } = this;
    if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await this.exited;
  }
}


/**
 * A recorder, and `start(labels, options)` for nats nodes that are all killed (and the recorder
 * saved) when the test ends; `cleanups` run before that, last first.
 */
function cluster(t) {
  const recorder = new Recorder(`${FILE}--${t.name}`);
  const nodes = [];
  const cleanups = [];
  t.after(async () => {
    closeAll(recorder);
    for (const cleanup of cleanups.reverse()) {
      try {
        await cleanup();
      } catch (error) {
        recorder.add('cleanup', `failed: ${error.message}`);
      }
    }
    await Promise.all(nodes.map((node) => node.cleanup()));
    recorder.save();
  });
  t.diagnostic(`frames and server output: ${path.relative(process.cwd(), recorder.path)}`);
  const start = async (labels, options) => {
    const started = [];
    for (const label of labels) {
      const node = await Server.start(recorder, { engine: 'nats', label, ...options });
      nodes.push(node);
      started.push(node);
    }
    return started;
  };
  return { recorder, start, cleanups };
}

/** A client of `node` (or of anything with a `ws` URL) subscribed to `channel`, with its records. */
async function subscriber(recorder, node, label, channel, options = {}) {
  const centrifuge = client(node, recorder, label, { token: token(`u-${label}`), ...options });
  const sub = watch(recorder, label, centrifuge.newSubscription(channel));
  const seen = collect(sub);
  const subscribedEvents = [];
  sub.on('subscribed', (ctx) => subscribedEvents.push(ctx));
  centrifuge.connect();
  sub.subscribe();
  await sub.ready(5_000);
  return { centrifuge, sub, seen, subscribedEvents };
}

test('three nodes share publications, presence and history through NATS', {
  timeout: 60_000,
  skip: SKIP,
}, async (t) => {
  const { recorder, start, cleanups } = cluster(t);
  const prefix = uniquePrefix('three');
  cleanups.push(() => dropStreams(recorder, SHARED_NATS_PORT, prefix));
  const nodes = await start(['A', 'B', 'C'], { natsUrl: SHARED_NATS, natsPrefix: prefix });
  const [a, b, c] = nodes;
  await allReady(nodes, 200, '/ready 200 on the three nodes', 10_000);

  const channel = room('nats');
  const ann = await subscriber(recorder, a, 'ann', channel);
  const bob = await subscriber(recorder, b, 'bob', channel);
  const cat = await subscriber(recorder, c, 'cat', channel);
  const all = [['ann', 'A', ann], ['bob', 'B', bob], ['cat', 'C', cat]];

  // One publication through node A's API, one from an SDK client connected to node A.
  const first = await a.publish(channel, { n: 1, via: 'api' });
  await ann.sub.publish({ n: 2, via: 'sdk' });
  for (const [label, , { seen }] of all) {
    await until(() => seen.length >= 2, `${label} to receive both publications`, 5_000);
  }
  await sleep(300); // time for a duplicate to show up

  const history = await fullHistory(a, channel);
  assert.equal(history.epoch, first.epoch, 'one epoch');
  assert.deepEqual(history.publications.map((p) => p.data), [{ n: 1, via: 'api' }, { n: 2, via: 'sdk' }]);
  const expected = history.publications.map((p) => ({ data: p.data, offset: p.offset }));
  assert.equal(expected[0].offset, first.offset);
  for (const [label, node, { seen }] of all) {
    assert.deepEqual(seen.map((p) => ({ data: p.data, offset: p.offset })), expected, `${label} (node ${node}) saw both once, in order`);
  }
  assert.equal(bob.seen[1].info?.user, 'u-ann', `info of the SDK publication on node B: ${JSON.stringify(bob.seen[1])}`);
  assert.equal(cat.seen[1].info?.client, ann.centrifuge.clientId);

  // Presence asked of any node lists the clients of every node.
  const ids = all.map(([, , { centrifuge }]) => centrifuge.clientId);
  assert.ok(ids.every(Boolean), `client ids: ${JSON.stringify(ids)}`);
  for (const node of nodes) {
    const { result } = await node.api('presence', { channel });
    assert.deepEqual(Object.keys(result.presence).sort(), [...ids].sort(), `presence on node ${node.port}: ${JSON.stringify(result)}`);
    assert.deepEqual(Object.values(result.presence).map((p) => p.user).sort(), ['u-ann', 'u-bob', 'u-cat']);
  }
  const { result: stats } = await b.api('presence_stats', { channel });
  assert.deepEqual(stats, { num_clients: 3, num_users: 3 });

  // History is the same from every node.
  for (const node of [b, c]) {
    assert.deepEqual(await fullHistory(node, channel), history, `history on node ${node.port} equals node A's`);
  }
});

test('a client whose node is SIGKILLed reconnects to another node and recovers every acknowledged publication once (NATS)', {
  timeout: 60_000,
  skip: SKIP,
}, async (t) => {
  const { recorder, start, cleanups } = cluster(t);
  const prefix = uniquePrefix('kill');
  cleanups.push(() => dropStreams(recorder, SHARED_NATS_PORT, prefix));
  const nodes = await start(['A', 'B', 'C'], { natsUrl: SHARED_NATS, natsPrefix: prefix });
  const [a, b, c] = nodes;
  await allReady(nodes, 200, '/ready 200 on the three nodes', 10_000);

  const proxy = await new Proxy(recorder, a.port).listen();
  cleanups.push(() => proxy.close());
  const channel = room('X');
  const ann = await subscriber(recorder, { ws: `ws://127.0.0.1:${proxy.port}/connection/websocket` }, 'ann', channel, {
    minReconnectDelay: 100,
    maxReconnectDelay: 500,
  });
  const firstClient = ann.centrifuge.clientId;

  // Node C publishes every 50 ms; what it acknowledged is kept.
  const acks = [];
  const failures = [];
  let publishing = true;
  const publisher = (async () => {
    for (let n = 1; publishing; n += 1) {
      try {
        acks.push({ n, ...(await c.publish(channel, { n })) });
      } catch (error) {
        failures.push(`${n}: ${error.message}`);
      }
      await sleep(50);
    }
  })();
  cleanups.push(async () => { publishing = false; await publisher; });

  await until(() => acks.length >= 10 && ann.seen.length >= 5, 'ten acknowledged publications, five received', 10_000);
  const resubscribed = once(ann.sub, 'subscribed', { timeout: 15_000 });
  await a.kill('SIGKILL');
  recorder.add('test', `node A killed after ${acks.length} acknowledged publications, ${ann.seen.length} received`);
  proxy.switchTo(b.port);

  const ctx = await resubscribed;
  recorder.add('test', `resubscribed after ${acks.length} acknowledged publications`);
  assert.notEqual(ann.centrifuge.clientId, firstClient, 'a new connection');
  assert.equal(ctx.wasRecovering, true, `subscribed context: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.recovered, true, `subscribed context: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.streamPosition?.epoch, acks[0].epoch, 'same epoch');

  const resumedAt = acks.length;
  await until(() => acks.length >= resumedAt + 10, 'ten more acknowledged publications', 10_000);
  publishing = false;
  await publisher;
  assert.deepEqual(failures, [], 'no publish through node C failed');
  const last = acks.at(-1);
  await until(() => ann.seen.at(-1)?.offset >= last.offset, `the client to reach offset ${last.offset}`, 5_000)
    .catch(() => {}); // the exact comparison below says what is missing
  await sleep(300); // time for a duplicate to show up

  assert.deepEqual(ann.seen.map((p) => p.data.n), acks.map((ack) => ack.n), 'every acknowledged publication once, in order');
  assert.deepEqual(ann.seen.map((p) => p.offset), acks.map((ack) => ack.offset));
  const history = await fullHistory(b, channel);
  assert.deepEqual(
    ann.seen.map((p) => ({ data: p.data, offset: p.offset })),
    history.publications.map((p) => ({ data: p.data, offset: p.offset })),
    'what the client saw is the history',
  );
  assert.equal(ann.subscribedEvents.length, 2, 'subscribed once, then resubscribed once');
});

// The nats-server comes back on the same port with the same storage folder, so the history
// stream and the meta bucket (file storage) survive: the channel keeps its epoch and offsets
// continue. Node A's NATS subscription was down meanwhile; whatever it could have missed is
// filled from history (or its clients are told to resubscribe, and recover from history). Either
// way the client must end with every acknowledged publication exactly once, and any resubscription
// after the restart must be `recovered: true` in the same epoch, or else say `recovered: false`.
test('a NATS outage: nodes stay up, /ready goes 503 and back, publishing fails fast and resumes with no gap', {
  timeout: 60_000,
  skip: SKIP,
}, async (t) => {
  const { recorder, start, cleanups } = cluster(t);
  const storeDir = mkdtempSync(path.join(os.tmpdir(), 'plexus-sdk-nats-'));
  cleanups.push(() => rmSync(storeDir, { recursive: true, force: true }));
  const nats = new NatsChild(recorder, await freePort(), storeDir);
  cleanups.push(() => nats.kill());
  await nats.start();
  const nodes = await start(['A', 'B', 'C'], { natsUrl: nats.url, natsPrefix: uniquePrefix('outage') });
  const [a, b, c] = nodes;
  await allReady(nodes, 200, '/ready 200 on the three nodes', 10_000);

  const channel = room('outage');
  const ann = await subscriber(recorder, a, 'ann', channel, { minReconnectDelay: 100, maxReconnectDelay: 1_000 });
  const before = [];
  for (let n = 1; n <= 3; n += 1) before.push({ n, ...(await c.publish(channel, { n })) });
  await until(() => ann.seen.length >= 3, 'the three publications before the outage', 5_000);

  // NATS goes away.
  await nats.kill();
  recorder.add('test', 'nats-server killed');
  const downAt = Date.now();
  await allReady(nodes, 503, '/ready 503 on every node while NATS is down', 10_000);
  t.diagnostic(`/ready 503 everywhere ${Date.now() - downAt} ms after the kill`);
  for (const node of nodes) {
    const failed = await tryPublish(node, channel, { n: 'during' }, 10_000);
    assert.ok(!failed.error, `/api/publish on node ${node.port} answered during the outage (after ${failed.ms} ms): ${failed.error?.message}`);
    assert.ok(failed.ms <= 6_000, `/api/publish on node ${node.port} answered within ~5 s during the outage, took ${failed.ms} ms`);
    assert.ok(
      failed.status >= 400 || failed.body?.error,
      `/api/publish on node ${node.port} during the outage is an error: ${failed.status} ${JSON.stringify(failed.body)}`,
    );
    assert.equal(failed.body?.result, undefined, 'no result during the outage');
  }
  await sleep(Math.max(0, 1_500 - (Date.now() - downAt)));
  assert.ok((await Promise.all(nodes.map(readyStatus))).every((s) => s === 503), '/ready still 503');
  for (const node of nodes) {
    assert.equal(node.child.exitCode, null, `node ${node.port} still runs`);
    assert.equal(node.child.signalCode, null, `node ${node.port} still runs`);
  }

  // NATS comes back on the same port with the same storage folder.
  const restartedAt = Date.now();
  await nats.start();
  recorder.add('test', 'nats-server restarted');
  await allReady(nodes, 200, '/ready 200 on every node once NATS is back', 15_000);
  t.diagnostic(`nodes ready ${Date.now() - restartedAt} ms after nats-server restarted`);

  const after = [];
  for (let n = 4; n <= 8; n += 1) {
    after.push({ n, ...(await c.publish(channel, { n })) });
    await sleep(50);
  }
  for (const [i, node] of [a, b].entries()) after.push({ n: 9 + i, ...(await node.publish(channel, { n: 9 + i })) });
  const acks = [...before, ...after];
  await until(() => ann.seen.some((p) => p.data.n === 10), 'the last publication at the client', 10_000).catch(() => {});
  await sleep(500); // time for a duplicate to show up
  const got = ann.seen.map((p) => p.data.n);
  const later = ann.subscribedEvents.slice(1);
  recorder.add('test', `the client saw ${JSON.stringify(ann.seen.map((p) => [p.data.n, p.offset]))} ([n, offset]); subscribed events ${JSON.stringify(ann.subscribedEvents)}`);
  t.diagnostic(`resubscriptions after the restart: ${JSON.stringify(later.map((ctx) => ({ recovering: ctx.wasRecovering, recovered: ctx.recovered })))}`);

  // Never twice, never out of order; nothing missing unless a resubscription said recovered: false.
  assert.deepEqual(got, [...new Set(got)], `no publication twice: ${JSON.stringify(got)}`);
  assert.deepEqual(got, [...got].sort((x, y) => x - y), `in order: ${JSON.stringify(got)}`);
  const missing = acks.map((ack) => ack.n).filter((n) => !got.includes(n));
  if (missing.length > 0) {
    assert.ok(
      later.some((ctx) => ctx.wasRecovering && !ctx.recovered),
      `acknowledged but never delivered: n ${JSON.stringify(missing)}, and no subscribed event said recovered: false; subscribed events ${JSON.stringify(ann.subscribedEvents)}`,
    );
  }
  for (const ctx of later.filter((x) => x.wasRecovering && x.recovered)) {
    assert.equal(ctx.streamPosition?.epoch, before[0].epoch, `recovered: true only within the same epoch: ${JSON.stringify(ctx)}`);
  }

  // What this server does with the same storage folder: the stream survives, so one epoch,
  // offsets continuing, complete delivery, and no resubscription that gave anything up.
  assert.equal(new Set(acks.map((ack) => ack.epoch)).size, 1, `the epoch survives the restart: ${JSON.stringify(acks)}`);
  assert.deepEqual(acks.map((ack) => ack.offset), acks.map((ack) => before[0].offset + ack.n - 1), 'offsets continue without a gap');
  assert.deepEqual(later.filter((ctx) => !ctx.recovered), [], 'no resubscription reported recovered: false');
  assert.deepEqual(
    ann.seen.map((p) => ({ n: p.data.n, offset: p.offset })),
    acks.map((ack) => ({ n: ack.n, offset: ack.offset })),
    'every acknowledged publication once, in order',
  );
  for (const node of nodes) {
    const history = await fullHistory(node, channel);
    assert.deepEqual(history.publications.map((p) => p.data.n), acks.map((ack) => ack.n), `history on node ${node.port}`);
    assert.equal(history.epoch, before[0].epoch);
  }
});
