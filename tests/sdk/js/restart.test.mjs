// Durability: the embedded engine keeps history across a SIGKILL, and an SDK client that was
// subscribed before the kill recovers what was published after the restart.
//
// Skipped only when the server refuses `--engine embedded` as unknown.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  EngineUnavailable, Gate, Recorder, Server, client, closeAll, collect, freePort, once, room,
  token, until, watch,
} from './lib/harness.mjs';

const N = 20;

test('embedded engine: history survives SIGKILL and a subscribed client recovers after the restart', async (t) => {
  const recorder = new Recorder(`restart--${t.name}`);
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'plexus-sdk-js-restart-'));
  let server = null;
  t.after(async () => {
    closeAll(recorder);
    await server?.kill();
    rmSync(dataDir, { recursive: true, force: true });
    recorder.save();
  });
  t.diagnostic(`frames and server output: ${path.relative(process.cwd(), recorder.path)}`);
  const port = await freePort();
  try {
    server = await Server.start(recorder, { engine: 'embedded', dataDir, port, label: 'server1' });
  } catch (error) {
    if (error instanceof EngineUnavailable) {
      t.skip(error.message);
      return;
    }
    throw error;
  }
  const channel = room('restart');

  const gate = new Gate();
  const ann = client(server, recorder, 'ann', {
    token: token('u1'),
    minReconnectDelay: 200,
    maxReconnectDelay: 1_000,
  }, gate);
  const sub = watch(recorder, 'ann', ann.newSubscription(channel));
  const seen = collect(sub);
  ann.connect();
  sub.subscribe();
  await sub.ready(5_000);

  const acks = [];
  for (let i = 1; i <= N; i += 1) acks.push(await server.publish(channel, { n: i }));
  const epoch = acks[0].epoch;
  assert.ok(epoch, `publish result has an epoch: ${JSON.stringify(acks[0])}`);
  assert.ok(acks.every((a) => a.epoch === epoch), 'one epoch for all');
  assert.deepEqual(acks.map((a) => a.offset), acks.map((_, i) => acks[0].offset + i), 'consecutive offsets');
  await until(() => seen.length >= N, `the ${N} publications live`);

  // Kill hard; keep ann from reconnecting until the five new publications are in.
  gate.held = true;
  const away = once(ann, 'connecting', { timeout: 5_000 });
  await server.kill('SIGKILL');
  await away;

  server = await Server.start(recorder, { engine: 'embedded', dataDir, port, label: 'server2' });
  const { result: history } = await server.api('history', { channel, limit: 100 });
  assert.equal(history.epoch, epoch, 'same epoch after the restart');
  assert.deepEqual(history.publications.map((p) => p.data.n), acks.map((_, i) => i + 1), `all ${N} publications kept`);
  assert.deepEqual(history.publications.map((p) => p.offset), acks.map((a) => a.offset));
  assert.equal(history.offset, acks.at(-1).offset);

  const after = [];
  for (let i = N + 1; i <= N + 5; i += 1) after.push(await server.publish(channel, { n: i }));
  assert.ok(after.every((a) => a.epoch === epoch), 'the epoch goes on after the restart');
  assert.deepEqual(after.map((a) => a.offset), after.map((_, i) => acks.at(-1).offset + 1 + i));
  assert.notEqual(ann.state, 'connected');

  const resubscribed = once(sub, 'subscribed', { timeout: 8_000 });
  gate.held = false;
  const ctx = await resubscribed;
  assert.equal(ctx.wasRecovering, true, `subscribed context: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.recovered, true, `subscribed context: ${JSON.stringify(ctx)}`);
  await until(() => seen.length >= N + 5, 'the five publications after the restart', 5_000);
  await new Promise((resolve) => setTimeout(resolve, 300)); // time for a duplicate to show up
  assert.deepEqual(seen.map((p) => p.data.n), Array.from({ length: N + 5 }, (_, i) => i + 1),
    'in order, none missing, none twice');

  // The five came in the subscribe reply after the restart, i.e. by recovery.
  const last = recorder.frames('ann', '<').filter((f) => f.subscribe).at(-1).subscribe;
  assert.equal(last.recovered, true);
  assert.deepEqual((last.publications ?? []).map((p) => p.data.n), [21, 22, 23, 24, 25]);
});
