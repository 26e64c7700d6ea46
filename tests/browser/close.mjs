// A page that closes its WebTransport session leaves its room at once, in headless Debian
// chromium (playwright-core). The page's client (the library, over WebTransport) joins a room;
// the node lists it among the room's members (the HTTP API, asked from here); the page calls the
// client's close(), which is `WebTransport.close()`: Chromium sends a CLOSE_WEBTRANSPORT_SESSION
// capsule and FIN on the CONNECT stream and leaves the QUIC connection to the server. The member
// must be gone within LEAVE_MS, not at the QUIC idle timeout. A watcher on the same page (over
// WebSocket, keeping the room's presence) sees the closing user come (with no presence info)
// and, once the node's grace period is over, leave. Then a session the node ends (the operator's
// disconnect) reports the node's close code to the page.
// Usage: node tests/browser/close.mjs http://127.0.0.1:PORT API_KEY [LEAVE_MS [PRESENCE_LEAVE_MS]]
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { launchChromium } from './chromium.mjs';

const base = process.argv[2];
const apiKey = process.argv[3];
const LEAVE_MS = Number(process.argv[4] ?? 2000);
// The node's presence grace plus an interval, plus slack for a loaded box.
const PRESENCE_LEAVE_MS = Number(process.argv[5] ?? 5000);
if (!base || !apiKey) {
  console.error('usage: close.mjs <base url> <api key> [leave ms [presence leave ms]]');
  process.exit(2);
}
const TIMEOUT = 20_000;
const room = `close-${Date.now()}`;
const profile = mkdtempSync(join(tmpdir(), 'roomwire-chromium-'));

const context = await launchChromium(profile);

const pageErrors = [];
function check(ok, what) {
  if (!ok) throw new Error(what);
}

/** The users the node lists as the room's local members (none once the room is gone). */
async function members() {
  const response = await fetch(`${base}/api/v1/rooms/${room}?members=true`, {
    headers: { Authorization: `Bearer ${apiKey}` },
  });
  if (response.status === 404) return [];
  check(response.ok, `room info: HTTP ${response.status}`);
  const info = await response.json();
  return (info.members ?? []).map((m) => m.user);
}

/** Polls the node until `predicate(users)` holds; returns the milliseconds it took. */
async function waitForMembers(what, predicate, timeout) {
  const started = Date.now();
  for (;;) {
    const users = await members();
    if (predicate(users)) return Date.now() - started;
    if (Date.now() - started > timeout) {
      throw new Error(`${what}: not within ${timeout} ms (members: ${JSON.stringify(users)})`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

let failed = false;
try {
  const page = await context.newPage();
  page.on('console', (msg) => {
    console.log(`[page] ${msg.type()}: ${msg.text()}`);
    if (msg.type() === 'error') pageErrors.push(msg.text());
  });
  page.on('pageerror', (error) => {
    console.log(`[page] page error: ${error.message}`);
    pageErrors.push(error.message);
  });
  // The demo page without a name joins nothing; the client below is the page's only one.
  await page.goto(`${base}/?room=${room}`);
  await page.waitForFunction(() => window.roomwireDemo !== undefined, null, { timeout: TIMEOUT });
  await page.evaluate(async (r) => {
    const { RoomwireClient } = await import('/client/roomwire.js');
    const watcher = new RoomwireClient({ token: 'watcher', transport: 'websocket', storage: null, deviceId: null });
    window.watcher = watcher;
    window.presenceEvents = [];
    watcher.onPresenceJoin(({ member }) => window.presenceEvents.push(`+${member.userId}:${member.infoText}`));
    watcher.onPresenceLeave(({ userId }) => window.presenceEvents.push(`-${userId}`));
    await watcher.connect();
    await watcher.join(r, { presence: true, presenceInfo: 'Watcher' });
  }, room);

  // Twice: a second session of the same page, after the first closed, ends as promptly.
  for (const user of ['closer-1', 'closer-2']) {
    const transport = await page.evaluate(async ({ r, user }) => {
      const { RoomwireClient } = await import('/client/roomwire.js');
      const client = new RoomwireClient({ token: user, transport: 'webtransport', storage: null, deviceId: null });
      window.closing = client;
      await client.connect();
      await client.join(r);
      return client.transport;
    }, { r: room, user });
    check(transport === 'webtransport', `${user} connected over ${transport}, not WebTransport`);
    await waitForMembers(`${user} is a member`, (users) => users.includes(user), TIMEOUT);
    // The watcher's view lists the user (no presence info: an empty bytes field on the wire).
    await page.waitForFunction(
      ({ r, user }) => window.watcher.presenceView(r)?.members.some((m) => m.userId === user && m.infoText === ''),
      { r: room, user },
      { timeout: TIMEOUT, polling: 20 },
    );

    await page.evaluate(() => window.closing.close());
    const took = await waitForMembers(`${user} left`, (users) => !users.includes(user), LEAVE_MS);
    console.log(`${user}: the node dropped the member ${took} ms after close()`);
    const closedAt = Date.now();
    await page.waitForFunction(
      ({ r, user }) => !window.watcher.presenceView(r).members.some((m) => m.userId === user),
      { r: room, user },
      { timeout: PRESENCE_LEAVE_MS, polling: 20 },
    );
    console.log(`${user}: gone from the watcher's presence ${Date.now() - closedAt} ms later`);
  }
  // (The watcher's own entry may come by the list or by a diff.)
  const events = (await page.evaluate(() => window.presenceEvents)).filter((e) => !e.includes('watcher'));
  check(
    JSON.stringify(events) === JSON.stringify(['+closer-1:', '-closer-1', '+closer-2:', '-closer-2']),
    `unexpected presence events: ${JSON.stringify(events)}`,
  );
  await page.evaluate(() => window.watcher.close());

  // The node's close code reaches the page over WebTransport (a CLOSE_WEBTRANSPORT_SESSION
  // capsule, read as WebTransport.closed's closeCode): the operator's disconnect is 4005.
  await page.evaluate(async () => {
    const { RoomwireClient } = await import('/client/roomwire.js');
    const client = new RoomwireClient({ token: 'kicked', transport: 'webtransport', storage: null, deviceId: null });
    window.kicked = client;
    window.kickedStatus = [];
    client.onStatus((s) => window.kickedStatus.push({ state: s.state, transport: s.transport, detail: s.detail }));
    await client.connect();
  });
  const kick = await fetch(`${base}/api/v1/users/kicked/disconnect`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${apiKey}` },
  });
  check(kick.ok, `disconnect: HTTP ${kick.status}`);
  await page.waitForFunction(() => window.kickedStatus.some((s) => s.state === 'reconnecting'), null, {
    timeout: TIMEOUT,
    polling: 20,
  });
  const lost = await page.evaluate(() => window.kickedStatus.find((s) => s.state === 'reconnecting'));
  console.log(`kicked: ${JSON.stringify(lost)}`);
  const up = await page.evaluate(() => window.kickedStatus.find((s) => s.state === 'connected'));
  check(up?.transport === 'webtransport', `kicked was on ${up?.transport}`);
  check(lost.detail?.code === 4005, `the page saw close code ${JSON.stringify(lost.detail)}, not 4005`);
  await page.evaluate(() => window.kicked.close());

  check(pageErrors.length === 0, `errors in the page: ${JSON.stringify(pageErrors)}`);
  console.log('CLOSE TEST PASSED');
} catch (error) {
  failed = true;
  console.error('CLOSE TEST FAILED:', error);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
