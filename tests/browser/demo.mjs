// Drives the demo page in headless Debian chromium (playwright-core, no downloaded browser):
// one page over WebTransport (certificate trusted through serverCertificateHashes), one forced
// onto WebSocket, chatting in one room; a typing indicator crosses as a QUIC datagram; a page
// without a name waits for one; a message typed while offline is sent on reconnect while the
// "reconnecting in N ms" indicator counts down; message ids are unique per client instance and a
// repeated id is acknowledged as a duplicate; a plain-http (insecure context) page chats too.
// Resume and history: a page reloaded while another publishes shows exactly what it missed
// (replayed, once) after what it had (history); a page whose position the room no longer keeps
// (the node runs `tiny.*` rooms keeping 3 messages) shows a reset notice; history() pages both
// ways; a room a reconnect cannot resume is reported as an error naming it; the device id
// outlives a reload.
// Saves a screenshot. Usage: node tests/browser/demo.mjs http://127.0.0.1:PORT [screenshot.png]
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { launchChromium } from './chromium.mjs';

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

const context = await launchChromium(profile, [`--host-resolver-rules=MAP ${INSECURE_HOST} 127.0.0.1`]);

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
  try {
    await page.waitForFunction(() => window.roomwireDemo?.ready === true, null, { timeout: TIMEOUT });
  } catch (error) {
    const seen = await page
      .evaluate(() => ({ state: document.getElementById('state')?.textContent, demo: window.roomwireDemo !== undefined }))
      .catch((e) => String(e));
    throw new Error(`the page did not get ready: ${JSON.stringify(seen)}: ${error.message}`);
  }
}

async function openPageIn(name, pageRoom) {
  const page = await context.newPage();
  watch(page, name);
  await page.goto(`${base}/?room=${pageRoom}&name=${name}`);
  await waitReady(page);
  return page;
}

async function openPage(name, extra, init, pageBase = base) {
  const page = await context.newPage();
  if (init) await page.addInitScript(init);
  watch(page, name);
  await page.goto(`${pageBase}/?room=${room}&name=${name}${extra}`);
  await waitReady(page);
  return page;
}

/**
 * Reloads `page` and holds the new page's client module until `whileAway()` has run: the old
 * page is gone by then (the new document is committed), so what whileAway() publishes is missed.
 */
async function reloadAway(page, whileAway) {
  let release;
  const gate = new Promise((resolve) => {
    release = resolve;
  });
  const pattern = '**/client/roomwire.js';
  await page.route(pattern, async (route) => {
    await gate;
    await route.continue();
  });
  await page.reload({ waitUntil: 'commit', timeout: TIMEOUT });
  try {
    await whileAway();
  } finally {
    release();
  }
  await waitReady(page);
  await page.unroute(pattern);
}

/** Publishes from a client of its own in `page` (another user, no stored state); returns the acks. */
async function publishFrom(page, targetRoom, texts) {
  return page.evaluate(async ({ targetRoom, texts }) => {
    const { RoomwireClient } = await import('/client/roomwire.js');
    const other = new RoomwireClient({ token: 'frank', transport: 'websocket', storage: null, deviceId: null });
    await other.connect();
    const acks = [];
    for (const text of texts) {
      acks.push(await other.publish(targetRoom, JSON.stringify({ type: 'chat', name: 'frank', text })));
    }
    other.close();
    return acks;
  }, { targetRoom, texts });
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
    client.onReset((reset) => window.gaps.push(reset));
    client.onGap((gap) => window.gaps.push(gap)); // deprecated, but must agree
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
  if (replayed[3].text !== 'while alice was away' || replayed[3].seq !== 4 || replayed[3].source !== 'replay') {
    throw new Error(`the missed message was not replayed: ${JSON.stringify(replayed)}`);
  }
  const gaps = await alice.evaluate(() => window.gaps);
  console.log('alice was told of resets:', JSON.stringify(gaps));
  if (gaps.length !== 0) {
    throw new Error(`expected no reset after the resume, got ${JSON.stringify(gaps)}`);
  }
  await say(bob, 'after the reconnect');
  const afterReconnect = await waitForMessages(alice, 5);
  if (afterReconnect[4].text !== 'after the reconnect') {
    throw new Error(`no message after the reconnect: ${JSON.stringify(afterReconnect)}`);
  }
  // Bob's own acknowledgement may come a moment after Alice has the message: wait for it, so
  // the outbox below holds only what he types while offline.
  await bob.waitForFunction(() => window.roomwireDemo.outbox.length === 0, null, { timeout: TIMEOUT });

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

  // A reload mid-conversation: while bob's page is away (the old page gone, the new one not yet
  // connected) frank publishes twice. The new page joins with the position the old one kept
  // in sessionStorage: the node replays exactly those two, once, and the page shows the earlier
  // conversation from history() before them, numbered as before.
  const beforeReload = await bob.evaluate(() => ({
    messages: window.roomwireDemo.messages,
    deviceId: window.roomwireDemo.client.deviceId,
  }));
  const awayTexts = ['sent during the reload', 'also sent during the reload'];
  let awayAcks = null;
  await reloadAway(bob, async () => {
    awayAcks = await publishFrom(alice, room, awayTexts);
  });
  const reloaded = await waitForText(bob, awayTexts[1]);
  console.log('bob after the reload:', JSON.stringify(reloaded));
  const replayedTexts = reloaded.filter((m) => m.source === 'replay').map((m) => m.text);
  if (JSON.stringify(replayedTexts) !== JSON.stringify(awayTexts)) {
    throw new Error(`the reloaded page was not replayed exactly what it missed: ${JSON.stringify(replayedTexts)}`);
  }
  const seqs = reloaded.map((m) => m.seq);
  const lastSeq = awayAcks[awayAcks.length - 1].seq;
  if (new Set(seqs).size !== seqs.length || seqs.some((seq, i) => seq !== lastSeq - seqs.length + 1 + i)) {
    throw new Error(`duplicates or holes after the reload: ${JSON.stringify(seqs)}`);
  }
  const earlier = reloaded.filter((m) => m.source === 'history');
  const hadBefore = beforeReload.messages.map(({ text, seq }) => ({ text, seq }));
  if (JSON.stringify(earlier.map(({ text, seq }) => ({ text, seq }))) !== JSON.stringify(hadBefore)) {
    throw new Error(`history() did not show what the page had before the reload: ${JSON.stringify(earlier)}`);
  }
  const deviceAfter = await bob.evaluate(() => window.roomwireDemo.client.deviceId);
  console.log(`bob's device id before and after the reload: ${beforeReload.deviceId} ${deviceAfter}`);
  if (!/^[0-9a-f]{32}$/.test(deviceAfter ?? '') || deviceAfter !== beforeReload.deviceId) {
    throw new Error('the device id is not kept across a reload');
  }

  // history() through the library: pages back (newest first) and forward (oldest first).
  const pages = await alice.evaluate(async (historyRoom) => {
    const client = window.roomwireDemo.client;
    const newest = await client.history(historyRoom, { limit: 2 });
    const back = await client.history(historyRoom, { before: newest.messages[1], limit: 2 });
    const forward = await client.history(historyRoom, { after: { epoch: newest.position.epoch, seq: 0 }, limit: 3 });
    const seqs = (page) => page.messages.map((m) => m.seq);
    return {
      newest: seqs(newest), back: seqs(back), forward: seqs(forward), more: [newest.more, back.more, forward.more],
      position: newest.position, oldest: newest.oldest, text: forward.messages[0].text(),
    };
  }, room);
  console.log('history pages:', JSON.stringify(pages));
  const p = pages.position.seq;
  if (
    p !== lastSeq ||
    JSON.stringify(pages.newest) !== JSON.stringify([p, p - 1]) ||
    JSON.stringify(pages.back) !== JSON.stringify([p - 2, p - 3]) ||
    JSON.stringify(pages.forward) !== JSON.stringify([1, 2, 3]) ||
    pages.more.some((more) => more !== true) ||
    pages.oldest?.seq !== 1 ||
    !pages.text.includes('hello from WebTransport')
  ) {
    throw new Error(`unexpected history pages: ${JSON.stringify(pages)}`);
  }

  // A reset: dave's page is away while seven messages go to a room that keeps three. The page
  // says so (no silent hole, nothing renumbered) and shows what the room still keeps.
  const tinyRoom = `tiny.r${Date.now()}`;
  const dave = await openPageIn('dave', tinyRoom);
  await say(dave, 'before the reset');
  await waitForText(dave, 'before the reset');
  const tinyTexts = Array.from({ length: 7 }, (_, i) => `tiny ${i + 1}`);
  await reloadAway(dave, async () => {
    await publishFrom(bob, tinyRoom, tinyTexts);
  });
  await dave.waitForFunction(() => window.roomwireDemo.resets.length > 0, null, { timeout: TIMEOUT });
  const afterReset = await dave.evaluate(() => ({
    resets: window.roomwireDemo.resets,
    messages: window.roomwireDemo.messages,
    notices: document.getElementById('notices').textContent,
  }));
  console.log('dave after the reset:', JSON.stringify(afterReset));
  const [reset] = afterReset.resets;
  if (
    afterReset.resets.length !== 1 ||
    reset.room !== tinyRoom ||
    reset.reason !== 'not_kept' ||
    reset.since.seq !== 1 ||
    reset.position.seq !== 8 ||
    reset.oldest?.seq !== 6 ||
    reset.oldest.epoch !== reset.position.epoch
  ) {
    throw new Error(`the reset was not reported as expected: ${JSON.stringify(afterReset.resets)}`);
  }
  if (!afterReset.notices.includes('no longer kept')) throw new Error('no reset notice on the page');
  const kept = afterReset.messages.map((m) => `${m.seq}:${m.text}:${m.source}`);
  if (JSON.stringify(kept) !== JSON.stringify(['6:tiny 5:history', '7:tiny 6:history', '8:tiny 7:history'])) {
    throw new Error(`the page does not show what the room keeps: ${JSON.stringify(kept)}`);
  }

  // A reconnect resumes every joined room in its Connect; a room the node refuses (here a name
  // it never accepts, standing in for a permission withdrawn) is reported as an error naming it,
  // and the other rooms go on.
  const refused = await alice.evaluate(async (okRoom) => {
    const { RoomwireClient } = await import('/client/roomwire.js');
    const client = new RoomwireClient({ token: 'gina', transport: 'websocket', storage: null, deviceId: null });
    const errors = [];
    const resets = [];
    client.onError((error) => errors.push({ room: error.room, code: error.code, reason: error.reason }));
    client.onReset((reset) => resets.push(reset));
    await client.connect();
    await client.join(okRoom);
    client.rooms.set('not..a.room', { epoch: 1, seq: 0 });
    const sessions = client.sessions;
    client.conn.ws.close();
    const deadline = Date.now() + 15000;
    while ((client.sessions === sessions || client.state !== 'connected') && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const rooms = [...client.rooms.keys()];
    client.close();
    return { errors, resets, rooms, state: client.sessions > sessions };
  }, room);
  console.log('a refused resume:', JSON.stringify(refused));
  if (
    !refused.state ||
    refused.errors.length !== 1 ||
    refused.errors[0].room !== 'not..a.room' ||
    refused.errors[0].reason !== 'node' ||
    JSON.stringify(refused.rooms) !== JSON.stringify([room]) ||
    refused.resets.length !== 0
  ) {
    throw new Error(`a refused resume was not reported: ${JSON.stringify(refused)}`);
  }

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
    deviceId: window.roomwireDemo.client.deviceId,
  }));
  console.log('erin on', insecureBase, JSON.stringify(insecure));
  if (insecure.secure !== false || insecure.transport !== 'websocket' || !/^[0-9a-f]{32}$/.test(insecure.deviceId ?? '')) {
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
