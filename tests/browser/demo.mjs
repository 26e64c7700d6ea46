// Drives the demo page in headless Debian chromium (playwright-core, no downloaded browser):
// one page over WebTransport (certificate trusted through serverCertificateHashes), one forced
// onto WebSocket, chatting in one room; a typing indicator crosses as a QUIC datagram. Saves a
// screenshot. Usage: node tests/browser/demo.mjs http://127.0.0.1:PORT [screenshot.png]
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { chromium } from 'playwright-core';

const base = process.argv[2];
const screenshot = process.argv[3] ?? 'target/artifacts/demo.png';
if (!base) {
  console.error('usage: demo.mjs <base url> [screenshot]');
  process.exit(2);
}
const TIMEOUT = 20_000;
const room = `demo-${Date.now()}`;
const profile = mkdtempSync(join(tmpdir(), 'roomwire-chromium-'));

const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});

async function openPage(name, extra, init) {
  const page = await context.newPage();
  if (init) await page.addInitScript(init);
  page.on('console', (msg) => console.log(`[${name}] ${msg.type()}: ${msg.text()}`));
  page.on('pageerror', (error) => console.log(`[${name}] page error: ${error.message}`));
  await page.goto(`${base}/?room=${room}&name=${name}${extra}`);
  await page.waitForFunction(() => window.roomwireDemo?.ready === true, null, { timeout: TIMEOUT });
  return page;
}

async function say(page, text) {
  await page.fill('#text', text);
  await page.click('#sendButton');
}

async function waitForMessages(page, count) {
  await page.waitForFunction(
    (n) => window.roomwireDemo.messages.length >= n,
    count,
    { timeout: TIMEOUT },
  );
  return page.evaluate(() => window.roomwireDemo.messages);
}

let failed = false;
try {
  const alice = await openPage('alice', '');
  const bob = await openPage('bob', '&transport=websocket');
  const transports = [
    await alice.textContent('#transport'),
    await bob.textContent('#transport'),
  ];
  console.log('transports:', transports);
  if (transports[0] !== 'webtransport' || transports[1] !== 'websocket') {
    throw new Error(`expected webtransport/websocket, got ${transports}`);
  }

  await say(alice, 'hello from WebTransport');
  await waitForMessages(bob, 1);
  await say(bob, 'hello from WebSocket');
  await say(alice, 'third');
  const a = await waitForMessages(alice, 3);
  const b = await waitForMessages(bob, 3);
  console.log('alice saw', JSON.stringify(a));
  console.log('bob saw', JSON.stringify(b));
  if (JSON.stringify(a) !== JSON.stringify(b)) throw new Error('the two pages saw different orders');
  if (a.map((m) => m.text).join('|') !== 'hello from WebTransport|hello from WebSocket|third') {
    throw new Error(`unexpected messages ${JSON.stringify(a)}`);
  }

  // Bob types: the node sends alice (WebTransport) the indicator as a datagram. Datagrams may be
  // lost, so typing continues (one indicator per second at most) until one arrives.
  // Each keystroke renews the indicator for 3 s, so the check is made while bob keeps typing.
  let seen = null;
  for (let i = 0; i < 15 && !seen; i++) {
    await bob.type('#text', 'x');
    seen = await alice
      .waitForFunction(
        () =>
          document.getElementById('typing').textContent.includes('bob is typing') &&
          window.roomwireDemo.lastTyping,
        null,
        { timeout: 1200 },
      )
      .then((handle) => handle.jsonValue())
      .catch(() => null);
  }
  console.log('alice saw typing:', JSON.stringify(seen));
  if (!seen || seen.name !== 'bob' || seen.datagram !== true) {
    throw new Error(`no datagram typing indicator from bob: ${JSON.stringify(seen)}`);
  }

  // Lose alice's connection (as a network failure would): the client reconnects with backoff,
  // over WebTransport again, rejoins the room, and the chat goes on. The first retry waits at
  // least 1.5 s here, so bob's message below is published while alice is away: her rejoin must
  // report it as a gap (the node does not replay it yet).
  await alice.evaluate(() => {
    const client = window.roomwireDemo.client;
    window.gaps = [];
    client.onGap((gap) => window.gaps.push(gap));
    client.initialBackoffMs = 3000;
    client.conn.wt.close();
  });
  await say(bob, 'while alice was away');
  await waitForMessages(bob, 4); // sequenced (seq 4) before alice's first retry
  await alice.waitForFunction(
    () => window.roomwireDemo.client.sessions >= 2 && window.roomwireDemo.client.transport === 'webtransport',
    null,
    { timeout: TIMEOUT },
  );
  console.log('alice reconnected over', await alice.textContent('#transport'));
  const gaps = await alice.evaluate(() => window.gaps);
  console.log('alice was told of gaps:', JSON.stringify(gaps));
  if (gaps.length !== 1 || gaps[0].fromSeq !== 4 || gaps[0].toSeq !== 4 || gaps[0].epochChanged) {
    throw new Error(`expected one gap at seq 4, got ${JSON.stringify(gaps)}`);
  }
  await say(bob, 'after the reconnect');
  const afterReconnect = await waitForMessages(alice, 4);
  if (afterReconnect[3].text !== 'after the reconnect') {
    throw new Error(`no message after the reconnect: ${JSON.stringify(afterReconnect)}`);
  }
  // A browser without WebTransport falls back to WebSocket on its own (no query flag).
  const carol = await openPage('carol', '', () => {
    delete window.WebTransport;
  });
  const carolTransport = await carol.textContent('#transport');
  console.log('carol (no WebTransport API) connected over', carolTransport);
  if (carolTransport !== 'websocket') throw new Error(`carol used ${carolTransport}`);
  await say(carol, 'fallback works');
  await waitForMessages(alice, 5);

  mkdirSync(dirname(screenshot), { recursive: true });
  await alice.screenshot({ path: screenshot, fullPage: true });
  console.log(`screenshot: ${screenshot}`);
  console.log('BROWSER TEST PASSED');
} catch (error) {
  failed = true;
  console.error('BROWSER TEST FAILED:', error);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
