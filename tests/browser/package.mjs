// The npm package as an application gets it: `npm pack` in web/, the tarball installed into a
// scratch project, its types compiled by tsc (an application under --strict, and roomwire.js
// checked against its own declarations), the package imported by Node, and a page that imports
// the installed package served from a static server of its own (another origin than the node's)
// chatting through a real node in Chromium: one client over WebTransport (the certificate hash
// fetched across origins), one over WebSocket, one message each way. Nothing of the node's
// /client/ is loaded, and no .proto is fetched.
// Usage: node tests/browser/package.mjs http://127.0.0.1:NODE_PORT PAGE_PORT
// (the node must list http://127.0.0.1:PAGE_PORT in server.allowed_origins).
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, extname, join, normalize, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchChromium } from './chromium.mjs';

const nodeBase = process.argv[2];
const pagePort = Number(process.argv[3]);
if (!nodeBase || !pagePort) {
  console.error('usage: package.mjs <node base url> <page port>');
  process.exit(2);
}
const TIMEOUT = 20_000;
const here = dirname(fileURLToPath(import.meta.url));
const repo = join(here, '../..');
const pageOrigin = `http://127.0.0.1:${pagePort}`;
const room = `package-${Date.now()}`;
const work = mkdtempSync(join(tmpdir(), 'roomwire-package-'));
const app = join(work, 'app');
const profile = join(work, 'chromium-profile');

function run(command, args, cwd) {
  console.log(`$ ${command} ${args.join(' ')}  (in ${relative(repo, cwd) || '.'})`);
  return execFileSync(command, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
}

function check(ok, what) {
  if (!ok) throw new Error(what);
}

let failed = false;
let server = null;
let context = null;
try {
  // 1. The tarball: what `npm pack` puts in it is what the package's "files" says.
  const packed = JSON.parse(run('npm', ['pack', '--json', '--pack-destination', work], join(repo, 'web')));
  const tarball = join(work, packed[0].filename);
  const files = packed[0].files.map((f) => f.path).sort();
  console.log('packed', packed[0].filename, files);
  for (const want of ['package.json', 'roomwire.js', 'roomwire.d.ts', 'types.d.ts', 'wire.js', 'wire.d.ts',
    'vendor/protobuf.min.js', 'vendor/LICENSE.protobufjs']) {
    check(files.includes(want), `the package lacks ${want}`);
  }
  check(!files.some((f) => f.endsWith('.html') || f.startsWith('tools/')), `the package ships the demo or tools: ${files}`);

  // 2. Installed into a scratch project, as an application installs it (no registry needed: the
  // package has no dependencies).
  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'roomwire-app', private: true, type: 'module' }));
  run('npm', ['install', '--no-audit', '--no-fund', '--offline', tarball], app);
  const installed = join(app, 'node_modules/@roomwire/client');

  // 3. Types: an application compiles against the declarations (nodenext and bundler
  // resolution), and the packed roomwire.js, type-checked as JavaScript, must match them.
  for (const name of readdirSync(join(here, 'package'))) {
    if (name.endsWith('.ts') || name.endsWith('.json')) copyFileSync(join(here, 'package', name), join(app, name));
  }
  mkdirSync(join(app, 'impl'));
  for (const name of ['roomwire.js', 'types.d.ts', 'wire.js', 'wire.d.ts']) {
    copyFileSync(join(installed, name), join(app, 'impl', name));
  }
  const tsc = join(repo, 'node_modules/typescript/bin/tsc');
  run(process.execPath, [tsc, '-p', 'tsconfig.json'], app);
  run(process.execPath, [tsc, '-p', 'tsconfig.bundler.json'], app);
  console.log('tsc: the declarations compile under --strict and match roomwire.js');

  // 4. Node resolves the package through its "exports" and loads it without any request.
  const probe = `const url = import.meta.resolve('@roomwire/client');
const m = await import('@roomwire/client');
console.log(JSON.stringify({ url, exports: Object.keys(m).sort() }));`;
  const loaded = JSON.parse(run(process.execPath, ['--input-type=module', '-e', probe], app));
  console.log('node imports', JSON.stringify(loaded));
  check(
    JSON.stringify(loaded.exports) === JSON.stringify(['CloseCode', 'ErrorCode', 'RoomwireClient', 'RoomwireError']),
    `unexpected exports ${loaded.exports}`,
  );
  const entry = relative(app, fileURLToPath(loaded.url)).split(sep).join('/');

  // 5. The application's page, on its own origin, imports the package by name (an import map
  // standing in for a bundler).
  const page = readFileSync(join(here, 'package/index.html'), 'utf8').replace('__ENTRY__', `/${entry}`);
  writeFileSync(join(app, 'index.html'), page);
  const served = [];
  const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.json': 'application/json' };
  server = createServer((req, res) => {
    const path = new URL(req.url, pageOrigin).pathname;
    served.push(path);
    const file = normalize(join(app, path === '/' ? 'index.html' : path));
    if (!file.startsWith(app + sep)) {
      res.writeHead(403).end();
      return;
    }
    try {
      const body = readFileSync(file);
      res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream' }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(pagePort, '127.0.0.1', resolve);
  });
  console.log(`static server for the app on ${pageOrigin}`);

  context = await launchChromium(profile);
  const requests = [];
  const pageErrors = [];
  async function openApp(name, transport) {
    const tab = await context.newPage();
    tab.on('console', (msg) => console.log(`[${name}] ${msg.type()}: ${msg.text()}`));
    tab.on('pageerror', (error) => {
      console.log(`[${name}] page error: ${error.message}`);
      pageErrors.push(error.message);
    });
    tab.on('request', (request) => requests.push(request.url()));
    const query = new URLSearchParams({ node: nodeBase, room, name, transport });
    await tab.goto(`${pageOrigin}/?${query}`);
    await tab.waitForFunction(() => window.app?.ready === true || window.app?.error, null, { timeout: TIMEOUT });
    const error = await tab.evaluate(() => window.app.error);
    check(!error, `${name}'s page failed: ${error}`);
    return tab;
  }
  async function waitFor(tab, text) {
    await tab.waitForFunction((t) => window.app.received.some((m) => m.text === t), text, { timeout: TIMEOUT });
  }

  const alice = await openApp('alice', 'auto');
  const bob = await openApp('bob', 'websocket');
  const transports = [await alice.evaluate(() => window.app.client.transport), await bob.evaluate(() => window.app.client.transport)];
  console.log('transports:', transports);
  check(transports[0] === 'webtransport' && transports[1] === 'websocket', `expected webtransport/websocket, got ${transports}`);

  const toBob = await alice.evaluate(() => window.app.say('hello bob, from the package'));
  await waitFor(bob, 'hello bob, from the package');
  const toAlice = await bob.evaluate(() => window.app.say('hello alice, from the package'));
  await waitFor(alice, 'hello alice, from the package');
  console.log('acks:', JSON.stringify([toBob, toAlice]));
  check(toBob.duplicate === false && toAlice.seq === toBob.seq + 1, 'unexpected acks');

  // The node answers CORS for its client files too (an app may load them from the node): without
  // Access-Control-Allow-Origin the fetch would fail.
  const crossOrigin = await alice.evaluate(async (node) => {
    try {
      const response = await fetch(`${node}/client/wire.js`, { mode: 'cors' });
      return { status: response.status, type: response.type };
    } catch (error) {
      return { error: String(error) };
    }
  }, nodeBase);
  console.log('cross-origin fetch of the node\'s /client/wire.js:', JSON.stringify(crossOrigin));
  check(crossOrigin.status === 200 && crossOrigin.type === 'cors', 'no CORS on /client/*');

  const fromNode = requests.filter((url) => url.startsWith(nodeBase));
  console.log('requests to the node:', JSON.stringify(fromNode));
  check(!requests.some((url) => url.endsWith('.proto')), 'the client fetched a .proto');
  check(
    fromNode.every((url) => new URL(url).pathname === '/webtransport/certhash' || new URL(url).pathname === '/client/wire.js'),
    'the page loaded something of the node but the certificate hash',
  );
  check(served.includes(`/${entry}`) && served.includes('/node_modules/@roomwire/client/wire.js'), `the app did not load the package: ${served}`);
  check(pageErrors.length === 0, `page errors: ${pageErrors}`);
  console.log('PACKAGE TEST PASSED');
} catch (error) {
  failed = true;
  console.error('PACKAGE TEST FAILED:', error);
} finally {
  await context?.close();
  server?.close();
  rmSync(work, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
