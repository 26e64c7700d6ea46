// Drives the demo page in headless Debian chromium (playwright-core, no downloaded browser):
// one page over WebTransport (certificate trusted through serverCertificateHashes), one forced
// onto WebSocket, chatting in one room; a typing indicator crosses as a QUIC datagram; a page
// without a name waits for one; a message typed while offline is sent on reconnect while the
// "reconnecting in N ms" indicator counts down; message ids are unique per client instance and a
// repeated id is acknowledged as a duplicate; a plain-http (insecure context) page chats too.
// Saves a screenshot. Usage: node tests/browser/demo.mjs http://127.0.0.1:PORT [screenshot.png]
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
// A name that is not loopback makes a plain-http page an insecure context (no WebTransport, no
// crypto.randomUUID), as a page served from a LAN address would be.
const INSECURE_HOST = 'roomwire.test';
const insecureBase = base.replace('127.0.0.1', INSECURE_HOST);

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
    `--host-resolver-rules=MAP ${INSECURE_HOST} 127.0.0.1`,
  ],
});

/** Uncaught exceptions and unhandled rejections of every page, and console errors. */
const pageErrors = [];
const consoleErrors = [];

function watch(page, label) {
  page.on('console', (msg) => {
    console.log(`[${label}] ${msg.type()}: ${msg.text()}`);
    if (msg.type() === 'error') consoleErrors.push(`[${label}] ${msg.text()}`);
  });
  page.on('pageerror', (error) => {
    console.log(`[${label}] page error: ${error.message}`);
    pageErrors.push(`[${label}] ${error.message}`);
  });
}

async function waitReady(page) {
  await page.waitForFunction(() => window.roomwireDemo?.ready === true, null, { timeout: TIMEOUT });
}

async function openPage(name, extra, init, pageBase = base) {
  const page = await context.newPage();
  if (init) await page.addInitScript(init);
  watch(page, name);
  await page.goto(`${pageBase}/?room=${room}&name=${name}${extra}`);
  await waitReady(page);
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

async function waitForText(page, text) {
  await page.waitForFunction(
    (t) => window.roomwireDemo.messages.some((m) => m.text === t),
    text,
    { timeout: TIMEOUT },
  );
  return page.evaluate(() => window.roomwireDemo.messages);
}

/** The number in "reconnecting in N ms", or null. */
async function countdown(page) {
  const text = await page.textContent('#state');
  const match = /^reconnecting in (\d+) ms$/.exec(text);
  return match ? Number(match[1]) : null;
}

let failed = false;
try {
  // Without ?name= the page waits for a name instead of joining as a made-up guest.
  const alice = await context.newPage();
  watch(alice, 'alice');
  await alice.goto(`${base}/?room=${room}`);
  await alice.waitForFunction(() => window.roomwireDemo !== undefined, null, { timeout: TIMEOUT });
  const before = await alice.evaluate(() => ({
    client: window.roomwireDemo.client !== null,
    name: document.getElementById('name').value,
    state: document.getElementById('state').textContent,
  }));
  console.log('a page without a name:', JSON.stringify(before));
  if (before.client || before.name !== '') {
    throw new Error(`the page connected before a name was chosen: ${JSON.stringify(before)}`);
  }
  await alice.fill('#name', 'alice');
  await alice.click('#join button');
  await waitReady(alice);
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
  // over WebTransport again, resumes the room from its last position, and the chat goes on. The
  // first retry waits at least 1.5 s here, so bob's message below is published while alice is
  // away: the node replays it on the resume, and nothing is reported missing.
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
  const replayed = await waitForMessages(alice, 4);
  if (replayed[3].text !== 'while alice was away' || replayed[3].seq !== 4) {
    throw new Error(`the missed message was not replayed: ${JSON.stringify(replayed)}`);
  }
  const gaps = await alice.evaluate(() => window.gaps);
  console.log('alice was told of gaps:', JSON.stringify(gaps));
  if (gaps.length !== 0) {
    throw new Error(`expected no gap after the resume, got ${JSON.stringify(gaps)}`);
  }
  await say(bob, 'after the reconnect');
  const afterReconnect = await waitForMessages(alice, 5);
  if (afterReconnect[4].text !== 'after the reconnect') {
    throw new Error(`no message after the reconnect: ${JSON.stringify(afterReconnect)}`);
  }

  // Bob loses his connection and stays offline a few seconds (the first retry waits 4-8 s): the
  // indicator counts down, and what he types meanwhile waits in the outbox and goes out, once,
  // when he is back.
  await bob.evaluate(() => {
    const client = window.roomwireDemo.client;
    client.initialBackoffMs = 8000;
    client.attempt = 0;
    client.conn.ws.close();
  });
  await bob.waitForFunction(
    () => /^reconnecting in \d+ ms$/.test(document.getElementById('state').textContent),
    null,
    { timeout: TIMEOUT },
  );
  const first = await countdown(bob);
  await bob.waitForFunction(
    (n) => {
      const match = /^reconnecting in (\d+) ms$/.exec(document.getElementById('state').textContent);
      return match !== null && Number(match[1]) <= n - 500;
    },
    first,
    { timeout: 3000 },
  );
  console.log(`bob's countdown went from ${first} ms to ${await countdown(bob)} ms`);
  await say(bob, 'typed while offline');
  const offline = await bob.evaluate(() => ({
    state: window.roomwireDemo.client.state,
    outbox: window.roomwireDemo.outbox.map(({ text, status }) => ({ text, status })),
    shown: document.getElementById('outbox').textContent,
  }));
  console.log('bob while offline:', JSON.stringify(offline));
  if (
    offline.state !== 'reconnecting' ||
    offline.outbox.length !== 1 ||
    offline.outbox[0].status !== 'queued' ||
    !offline.shown.includes('will send when reconnected')
  ) {
    throw new Error(`the offline message is not shown as queued: ${JSON.stringify(offline)}`);
  }
  await waitForText(alice, 'typed while offline');
  await bob.waitForFunction(() => window.roomwireDemo.outbox.length === 0, null, { timeout: TIMEOUT });
  const sentOnce = (await waitForText(bob, 'typed while offline')).filter((m) => m.text === 'typed while offline');
  if (sentOnce.length !== 1) throw new Error(`the queued message arrived ${sentOnce.length} times`);
  console.log('bob reconnected and sent the queued message');

  // Message ids: two clients of one user (two tabs) pick different random prefixes, and a
  // publish repeating an id is acknowledged as a duplicate with the original's position.
  const ids = await alice.evaluate(async (idsRoom) => {
    const { RoomwireClient } = await import('/client/roomwire.js');
    const tab1 = new RoomwireClient({ token: 'zed', transport: 'websocket' });
    const tab2 = new RoomwireClient({ token: 'zed', transport: 'websocket' });
    await tab1.connect();
    await tab2.connect();
    const one = await tab1.publish(idsRoom, 'from the first tab');
    const two = await tab2.publish(idsRoom, 'from the second tab');
    const again = await tab2.publish(idsRoom, 'a retry of the first', one.clientMsgId);
    tab1.close();
    tab2.close();
    return { one, two, again };
  }, `${room}-ids`);
  console.log('acks of two tabs and a retry:', JSON.stringify(ids));
  const idFormat = /^[0-9a-f]{16}-1$/;
  if (!idFormat.test(ids.one.clientMsgId) || !idFormat.test(ids.two.clientMsgId)) {
    throw new Error(`ids are not a random prefix and a counter: ${JSON.stringify(ids)}`);
  }
  if (ids.one.clientMsgId === ids.two.clientMsgId || ids.one.duplicate !== false || ids.two.duplicate !== false) {
    throw new Error(`two tabs collided: ${JSON.stringify(ids)}`);
  }
  if (ids.two.seq !== ids.one.seq + 1) throw new Error(`both tabs' messages were not sequenced: ${JSON.stringify(ids)}`);
  if (ids.again.duplicate !== true || ids.again.seq !== ids.one.seq || ids.again.epoch !== ids.one.epoch) {
    throw new Error(`a repeated id was not acknowledged as a duplicate: ${JSON.stringify(ids.again)}`);
  }

  // A page on a plain-http origin that is not loopback (an insecure context: no WebTransport, no
  // crypto.randomUUID) chats over WebSocket.
  const erin = await openPage('erin', '', null, insecureBase);
  const insecure = await erin.evaluate(() => ({
    secure: window.isSecureContext,
    transport: window.roomwireDemo.client.transport,
  }));
  console.log('erin on', insecureBase, JSON.stringify(insecure));
  if (insecure.secure !== false || insecure.transport !== 'websocket') {
    throw new Error(`erin's page is not the insecure-context case: ${JSON.stringify(insecure)}`);
  }
  await say(erin, 'from a plain-http page');
  await waitForText(alice, 'from a plain-http page');

  // A browser without WebTransport falls back to WebSocket on its own (no query flag).
  const carol = await openPage('carol', '', () => {
    delete window.WebTransport;
  });
  const carolTransport = await carol.textContent('#transport');
  console.log('carol (no WebTransport API) connected over', carolTransport);
  if (carolTransport !== 'websocket') throw new Error(`carol used ${carolTransport}`);
  await say(carol, 'fallback works');
  await waitForText(alice, 'fallback works');

  // A reload is a new client: a new id prefix, so its ids cannot collide with the last page's
  // within the node's de-duplication window.
  const prefixBefore = await bob.evaluate(() => window.roomwireDemo.client.idPrefix);
  await bob.reload();
  await waitReady(bob);
  const prefixAfter = await bob.evaluate(() => window.roomwireDemo.client.idPrefix);
  console.log(`bob's id prefix before and after a reload: ${prefixBefore} ${prefixAfter}`);
  if (prefixBefore === prefixAfter) throw new Error('a reload kept the id prefix');

  const notConnected = consoleErrors.filter((e) => /not connected/i.test(e));
  if (pageErrors.length > 0 || notConnected.length > 0) {
    throw new Error(`uncaught errors in the pages: ${JSON.stringify([...pageErrors, ...notConnected])}`);
  }

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
