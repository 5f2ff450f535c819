// The quotes page at /quotes: live charts of the server's demo publisher, which publishes to
// quotes:{SYMBOL} only while someone is subscribed.

import { after, before, describe, test } from 'node:test';
import {
  assert, launchBrowser, openPage, QUICK, Server, shot, sleep, until, waitForState,
} from './lib/harness.mjs';

describe('quotes page', { timeout: 60_000 }, () => {
  const server = new Server('quotes');
  let browser;

  before(async () => {
    await server.start();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await server.close();
  });

  const points = (page, symbol) =>
    page.locator(`canvas[data-symbol="${symbol}"]`).getAttribute('data-points').then(Number);

  /** The channel's offset stays put for 1.5 s: nobody publishes to it. */
  async function assertQuiet(channel) {
    await sleep(700); // a tick that was already under way
    const before = await server.offset(channel);
    await sleep(1_500);
    assert.equal(await server.offset(channel), before, `${channel} still gets prices`);
  }

  test('streams while open, stops when deselected or closed', async () => {
    const response = await fetch(`${server.base}/quotes`);
    assert.equal(response.status, 200);
    assert.doesNotMatch(await response.text(), /<(script|link|img)[^>]+(src|href)=["']?(https?:)?\/\//i);

    const { context, page, errors } = await openPage(browser, `${server.base}/quotes`);
    await waitForState(page, 'connected');
    for (const symbol of ['ACME', 'GLOBEX']) {
      assert.equal(await page.locator(`canvas[data-symbol="${symbol}"]`).count(), 1);
    }
    // The chart gets points and the price text changes.
    await until(async () => (await points(page, 'ACME')) >= 3, 'ACME points', QUICK);
    const firstPrice = await page.locator('#price-ACME').textContent();
    assert.match(firstPrice, /^\d[\d,]*\.\d\d$/);
    await page.waitForFunction((first) => document.getElementById('price-ACME').textContent !== first,
      firstPrice, { timeout: QUICK });
    const pointsBefore = await points(page, 'ACME');
    const offsetBefore = await server.offset('quotes:ACME');
    await sleep(1_200);
    assert.ok(await points(page, 'ACME') > pointsBefore, 'the chart keeps getting points');
    assert.ok(await server.offset('quotes:ACME') > offsetBefore, 'the demo publisher runs while the page is open');
    assert.match(await page.locator('[data-symbol="ACME"] .updated').textContent(), /^updated /);
    // Something was drawn: the canvas is not blank.
    const inked = await page.evaluate(() => {
      const canvas = document.querySelector('canvas[data-symbol="ACME"]');
      const { data } = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
      let n = 0;
      for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
      return n;
    });
    assert.ok(inked > 1000, `only ${inked} pixels drawn`);
    await shot(page, 'quotes');

    // Deselecting a symbol unsubscribes: its publisher stops, the others go on.
    await page.getByRole('button', { name: 'GLOBEX' }).click();
    assert.equal(await page.getByRole('button', { name: 'GLOBEX' }).getAttribute('aria-pressed'), 'false');
    assert.equal(await page.locator('canvas[data-symbol="GLOBEX"]').count(), 0);
    await assertQuiet('quotes:GLOBEX');
    assert.ok(await server.offset('quotes:ACME') > offsetBefore);

    // Selecting it again starts it again.
    await page.getByRole('button', { name: 'GLOBEX' }).click();
    await until(async () => (await points(page, 'GLOBEX').catch(() => 0)) >= 2, 'GLOBEX points again', QUICK);

    // A phone-sized look.
    await page.setViewportSize({ width: 390, height: 844 });
    await sleep(200);
    const overflow = await page.evaluate(
      () => document.documentElement.scrollWidth - document.documentElement.clientWidth,
    );
    assert.ok(overflow <= 0, `page is ${overflow}px wider than a phone screen`);
    await shot(page, 'quotes-phone');
    assert.deepEqual(errors, []);

    // Closing the page stops the publisher.
    await context.close();
    await assertQuiet('quotes:ACME');
  });
});
