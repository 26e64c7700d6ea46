// The browser client's reconnect backoff, sampled in Node (no page needed): for attempt n the
// delay is uniform in [d/2, d] with d = min(maxBackoffMs, initialBackoffMs · 2^n) — it grows
// exponentially, is capped, and is spread (a thousand clients that lost the same node do not
// come back in step). Checks the bounds, the cap, and that the spread really is uniform:
// the mean near 3d/4 and each quarter of [d/2, d] holding about a quarter of the samples.
// Usage: node tests/browser/backoff.mjs
import { RoomwireClient } from '../../web/roomwire.js';

const INITIAL = 250;
const MAX = 30_000;
const SAMPLES = 4000;
const failures = [];
const check = (ok, what) => ok || failures.push(what);

const client = new RoomwireClient({
  url: 'http://127.0.0.1:9',
  storage: null,
  deviceId: null,
  initialBackoffMs: INITIAL,
  maxBackoffMs: MAX,
});
for (let attempt = 0; attempt <= 12; attempt++) {
  const d = Math.min(MAX, INITIAL * 2 ** attempt);
  const delays = [];
  for (let i = 0; i < SAMPLES; i++) {
    client.attempt = attempt;
    delays.push(client.backoff());
  }
  check(client.attempt === attempt + 1, `backoff() counts the attempt (${client.attempt})`);
  const min = Math.min(...delays);
  const max = Math.max(...delays);
  const mean = delays.reduce((a, b) => a + b, 0) / SAMPLES;
  check(min >= Math.floor(d / 2) && max <= d, `attempt ${attempt}: delays in [${min}, ${max}], not in [${d / 2}, ${d}]`);
  check(Math.abs(mean - 0.75 * d) < 0.03 * d, `attempt ${attempt}: mean ${mean.toFixed(0)} far from ${0.75 * d}`);
  const quarters = [0, 0, 0, 0];
  for (const v of delays) quarters[Math.min(3, Math.floor(((v - d / 2) / (d / 2)) * 4))] += 1;
  for (const [q, n] of quarters.entries()) {
    check(Math.abs(n / SAMPLES - 0.25) < 0.04, `attempt ${attempt}: quarter ${q} holds ${n} of ${SAMPLES}`);
  }
  console.log(`attempt ${attempt}: d ${d} ms, min ${min}, mean ${mean.toFixed(0)}, max ${max}, quarters ${quarters.join('/')}`);
}
if (failures.length > 0) {
  console.error(`BACKOFF TEST FAILED:\n${failures.join('\n')}`);
  process.exit(1);
}
console.log('BACKOFF TEST PASSED');
