// Presence in headless Debian chromium (playwright-core): alice's demo page joins a room with
// presence (over WebTransport); bob, a client of the library on a second page (over WebSocket),
// joins it with presenceInfo "Bob" and without presence events. Alice's view (the library's)
// then lists both users with bob's info, her page shows the member list, "2 online" and
// "Bob joined"; presence() reads every page (one user per page here) and presenceStats()
// counts. Alice's connection drops: the client resumes the room with its presence diffs and
// fetches the list again, and a third user (carol) then reaches alice's view through a diff.
// Bob leaves and carol's session ends: not before the node's grace period, and within it plus
// an interval (plus slack), alice's view drops both, with a presenceleave each; her page says
// "Bob left", "Carol left" and "1 online".
// Usage: node tests/browser/presence.mjs http://127.0.0.1:PORT GRACE_MS INTERVAL_MS
// (the node must run with rooms.presence_grace_ms = GRACE_MS, presence_interval_ms = INTERVAL_MS).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { launchChromium } from './chromium.mjs';

const base = process.argv[2];
const GRACE_MS = Number(process.argv[3] ?? 1000);
const INTERVAL_MS = Number(process.argv[4] ?? 100);
if (!base) {
  console.error('usage: presence.mjs <base url> [grace ms] [interval ms]');
  process.exit(2);
}
const TIMEOUT = 20_000;
// How much later than grace + interval a leave may show on a loaded box.
const SLACK_MS = 3000;
const room = `presence-${Date.now()}`;
const profile = mkdtempSync(join(tmpdir(), 'roomwire-chromium-'));

const context = await launchChromium(profile);

const pageErrors = [];
function watch(page, label) {
  page.on('console', (msg) => {
    console.log(`[${label}] ${msg.type()}: ${msg.text()}`);
    if (msg.type() === 'error') pageErrors.push(`[${label}] ${msg.text()}`);
  });
  page.on('pageerror', (error) => {
    console.log(`[${label}] page error: ${error.message}`);
    pageErrors.push(`[${label}] ${error.message}`);
  });
}

function check(ok, what) {
  if (!ok) throw new Error(what);
}

/** Waits until `predicate(view, seen)` holds in alice's page; returns { view, seen }. */
async function waitForAlice(page, what, predicate, timeout = TIMEOUT) {
  const started = Date.now();
  try {
    await page.waitForFunction(
      ({ room, source }) => {
        const view = window.roomwireDemo.client.presenceView(room);
        // eslint-disable-next-line no-new-func
        return view !== null && new Function('view', 'seen', `return (${source})(view, seen);`)(view, window.seen);
      },
      { room, source: predicate.toString() },
      { timeout, polling: 20 },
    );
  } catch (error) {
    const state = await page.evaluate((r) => ({ view: window.roomwireDemo.client.presenceView(r), seen: window.seen }), room);
    throw new Error(`${what}: not within ${timeout} ms: ${JSON.stringify(state)}: ${error.message}`);
  }
  const state = await page.evaluate((r) => ({ view: window.roomwireDemo.client.presenceView(r), seen: window.seen }), room);
  console.log(`${what} (after ${Date.now() - started} ms):`, JSON.stringify(state.view.members));
  return state;
}

const brief = (members) => members.map((m) => `${m.userId}:${m.infoText}:${m.sessions}`);

let failed = false;
try {
  // Alice: the demo page, which joins with presence and her name as presence info. Her page's
  // client is watched from the start: its joins and leaves, and the lists it fetched.
  const alice = await context.newPage();
  watch(alice, 'alice');
  await alice.goto(`${base}/?room=${room}&name=alice`);
  await alice.waitForFunction(() => window.roomwireDemo?.ready === true, null, { timeout: TIMEOUT });
  await alice.evaluate(() => {
    const client = window.roomwireDemo.client;
    window.seen = { joins: [], leaves: [], fetches: 0 };
    client.onPresenceJoin(({ room: r, member }) => window.seen.joins.push({ room: r, userId: member.userId, info: member.infoText }));
    client.onPresenceLeave(({ room: r, userId }) => window.seen.leaves.push({ room: r, userId, at: Date.now() }));
    const presence = client.presence.bind(client);
    client.presence = (r) => {
      window.seen.fetches += 1;
      return presence(r);
    };
  });
  check((await alice.textContent('#transport')) === 'webtransport', 'alice is not on WebTransport');
  // Her own entry comes with the first diff after her session is reported.
  await waitForAlice(alice, 'alice lists herself', (view) => view.members.some((m) => m.userId === 'alice'));

  // Bob: a page of the demo without a name (it does not join: nobody shows as a nameless
  // guest), and a library client of its own there.
  const bobPage = await context.newPage();
  watch(bobPage, 'bob');
  await bobPage.goto(`${base}/?room=${room}`);
  await bobPage.waitForFunction(() => window.roomwireDemo !== undefined, null, { timeout: TIMEOUT });
  check(await bobPage.evaluate(() => window.roomwireDemo.client === null), 'a page without a name joined');
  const bobView = await bobPage.evaluate(async (r) => {
    const { RoomwireClient } = await import('/client/roomwire.js');
    const bob = new RoomwireClient({ token: 'bob', transport: 'websocket', storage: null, deviceId: null });
    window.bob = bob;
    await bob.connect();
    await bob.join(r, { presenceInfo: 'Bob' });
    return bob.presenceView(r);
  }, room);
  check(bobView === null, `bob keeps a presence he did not ask for: ${JSON.stringify(bobView)}`);

  // Alice's view: both users, bob with his info.
  const both = await waitForAlice(alice, 'alice lists bob', (view, seen) =>
    view.members.some((m) => m.userId === 'bob' && m.infoText === 'Bob') && seen.joins.some((j) => j.userId === 'bob'));
  check(
    JSON.stringify(brief(both.view.members)) === JSON.stringify(['alice:alice:1', 'bob:Bob:1']) &&
      both.view.users === 2 &&
      both.view.sessions === 2 &&
      both.view.truncated === false,
    `alice's view is not alice and bob: ${JSON.stringify(both.view)}`,
  );
  check(
    both.seen.joins.filter((j) => j.userId === 'bob').length === 1 &&
      both.seen.joins.every((j) => j.room === room) &&
      both.seen.leaves.length === 0,
    `unexpected presence events: ${JSON.stringify(both.seen)}`,
  );
  // The demo page shows it: the list beside the chat, the count, the line in the log.
  await alice.waitForFunction(
    () =>
      document.getElementById('online').textContent === '2 online' &&
      [...document.querySelectorAll('#members li')].map((li) => li.dataset.user).join(',') === 'alice,bob' &&
      document.getElementById('members').textContent.includes('Bob') &&
      [...document.querySelectorAll('#messages li.presence')].some((li) => li.textContent === 'Bob joined'),
    null,
    { timeout: TIMEOUT },
  );
  console.log('alice\'s page:', JSON.stringify(await alice.evaluate(() => ({
    online: document.getElementById('online').textContent,
    members: document.getElementById('members').textContent,
    log: window.roomwireDemo.presenceLog.map((l) => l.text),
  }))));

  // presence() reads every page (one user each here), presenceStats() counts.
  const read = await alice.evaluate(async (r) => {
    const client = window.roomwireDemo.client;
    let pages = 0;
    const request = client.request.bind(client);
    client.request = (kind, ...rest) => {
      if (kind.presence) pages += 1;
      return request(kind, ...rest);
    };
    client.presencePageSize = 1;
    try {
      const p = await client.presence(r);
      const stats = await client.presenceStats(r);
      return { ...p, members: p.members.map((m) => `${m.userId}:${m.infoText}:${m.sessions}`), pages, stats };
    } finally {
      delete client.request;
      client.presencePageSize = 1000;
    }
  }, room);
  console.log('presence() and presenceStats():', JSON.stringify(read));
  check(
    JSON.stringify(read.members) === JSON.stringify(['alice:alice:1', 'bob:Bob:1']) &&
      read.pages >= 2 &&
      read.users === 2 &&
      read.stats.users === 2 &&
      read.stats.sessions === 2 &&
      read.stats.epoch === read.epoch &&
      read.stats.version >= read.version,
    `presence() or presenceStats() read wrong: ${JSON.stringify(read)}`,
  );

  // Alice's connection drops. The client reconnects (within the grace period: she never
  // leaves), resumes the room with its presence diffs and fetches the list again; a user who
  // comes afterwards reaches her through a diff (no further fetch).
  const fetchesBefore = await alice.evaluate(() => {
    const client = window.roomwireDemo.client;
    client.conn.wt.close();
    return window.seen.fetches;
  });
  await alice.waitForFunction(
    ({ r, n }) => {
      const client = window.roomwireDemo.client;
      const view = client.presenceViews.get(r);
      return client.sessions >= 2 && client.state === 'connected' && client.transport === 'webtransport' &&
        window.seen.fetches > n && view !== undefined && view.buffer === null;
    },
    { r: room, n: fetchesBefore },
    { timeout: TIMEOUT },
  );
  const fetchesAfter = await alice.evaluate(() => window.seen.fetches);
  console.log(`alice reconnected and fetched the list again (${fetchesAfter - fetchesBefore} fetch)`);
  await bobPage.evaluate(async (r) => {
    const { RoomwireClient } = await import('/client/roomwire.js');
    const carol = new RoomwireClient({ token: 'carol', transport: 'websocket', storage: null, deviceId: null });
    window.carol = carol;
    await carol.connect();
    await carol.join(r, { presenceInfo: 'Carol' });
  }, room);
  const three = await waitForAlice(alice, 'alice lists carol', (view, seen) =>
    view.members.some((m) => m.userId === 'carol' && m.infoText === 'Carol') && seen.joins.some((j) => j.userId === 'carol'));
  // (Alice's old session may still count for a moment: the node lets a closing session finish.)
  const names = (members) => members.map((m) => `${m.userId}:${m.infoText}`);
  check(
    JSON.stringify(names(three.view.members)) === JSON.stringify(['alice:alice', 'bob:Bob', 'carol:Carol']) &&
      three.view.members.every((m) => m.sessions >= 1) &&
      three.view.users === 3,
    `alice's view after the reconnect: ${JSON.stringify(three.view)}`,
  );
  check(three.seen.fetches === fetchesAfter, `carol came by a fetch, not a diff: ${three.seen.fetches} fetches`);
  check(three.seen.leaves.length === 0, `someone left during alice's reconnect: ${JSON.stringify(three.seen.leaves)}`);

  // Bob leaves the room and carol's session ends. Both stay for the grace period, then go:
  // within grace + interval (+ slack), each with a presenceleave.
  const leftAt = await bobPage.evaluate(async (r) => {
    await window.bob.leave(r);
    window.carol.close();
    return Date.now();
  }, room);
  const gone = await waitForAlice(
    alice,
    'alice drops bob and carol',
    (view, seen) =>
      view.members.length === 1 && view.members[0].userId === 'alice' &&
      ['bob', 'carol'].every((u) => seen.leaves.some((l) => l.userId === u)),
    GRACE_MS + INTERVAL_MS + SLACK_MS,
  );
  const after = Math.max(...gone.seen.leaves.map((l) => l.at)) - leftAt;
  console.log(`bob and carol left; alice was told ${after} ms later (grace ${GRACE_MS} ms, interval ${INTERVAL_MS} ms)`);
  // Alice's session closed by wt.close() above is long gone: the node ends a session as soon as
  // the browser closes it, not at the QUIC idle timeout.
  check(
    JSON.stringify(brief(gone.view.members)) === JSON.stringify(['alice:alice:1']) && gone.view.users === 1 &&
      gone.view.sessions === 1,
    `alice's view after the leaves: ${JSON.stringify(gone.view)}`,
  );
  check(after >= GRACE_MS / 2, `the leaves came ${after} ms after leaving: before the grace period (${GRACE_MS} ms) was over`);
  check(
    gone.seen.leaves.length === 2 && gone.seen.leaves.every((l) => l.room === room),
    `unexpected leaves: ${JSON.stringify(gone.seen.leaves)}`,
  );
  await alice.waitForFunction(
    () => {
      const lines = [...document.querySelectorAll('#messages li.presence')].map((li) => li.textContent);
      return document.getElementById('online').textContent === '1 online' &&
        document.querySelectorAll('#members li').length === 1 &&
        lines.includes('Bob left') && lines.includes('Carol left');
    },
    null,
    { timeout: TIMEOUT },
  );
  const log = await alice.evaluate(() => window.roomwireDemo.presenceLog.map((l) => l.text));
  console.log('alice\'s chat log presence lines:', JSON.stringify(log));
  check(
    JSON.stringify(log.slice(0, 2)) === JSON.stringify(['Bob joined', 'Carol joined']) &&
      JSON.stringify(log.slice(2).sort()) === JSON.stringify(['Bob left', 'Carol left']),
    `unexpected presence lines (alice's own user is not announced): ${JSON.stringify(log)}`,
  );

  check(pageErrors.length === 0, `errors in the pages: ${JSON.stringify(pageErrors)}`);
  console.log('PRESENCE TEST PASSED');
} catch (error) {
  failed = true;
  console.error('PRESENCE TEST FAILED:', error);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
