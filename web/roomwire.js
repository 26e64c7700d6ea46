// @ts-check
// roomwire browser client, published as the npm package @roomwire/client and served by every node
// at /client/roomwire.js: WebTransport first (trusting the node's generated certificate through
// serverCertificateHashes), WebSocket as the fallback, reconnect with exponential backoff and
// jitter, application heartbeats (Ping frames), and rooms rejoined after a reconnect.
//
// Frames are Protobuf, encoded by the vendored protobuf.js from the wire contract compiled into
// ./wire.js (generated from proto/roomwire/v1/roomwire.proto by tools/generate-wire.mjs; a test
// fails when it is out of date), so the client makes no request for the contract at run time.
//
// Types: ./roomwire.d.ts, written by hand. This file stays plain JavaScript because the node
// embeds it (include_str!) and builds with cargo alone, so what it serves must be the source; a
// TypeScript source would need a compile step in every cargo build or a committed build output.
// tsc keeps the two honest (tests/browser/package.mjs): this file is type-checked (checkJs,
// strict) and must be assignable to the declarations, and a consumer compiles against them.
//
//   import { RoomwireClient } from '@roomwire/client';
//   const client = new RoomwireClient({ url: 'https://node.example', token: 'alice' });
//   client.onMessage((m, info) => console.log(m.room, m.seq, m.text(), info.unreliable));
//   await client.connect();
//   await client.join('lobby');
//   const ack = await client.publish('lobby', 'hello'); // { epoch, seq, duplicate, ... }
//   client.publishUnreliable('lobby', 'typing');

import './vendor/protobuf.min.js';
import { CloseCode, ErrorCode, descriptor } from './wire.js';

export { CloseCode, ErrorCode };

/**
 * @typedef {import('./types.js').Connected} Connected
 * @typedef {import('./types.js').ConnectionState} ConnectionState
 * @typedef {import('./types.js').GapEvent} GapEvent
 * @typedef {import('./types.js').Joined} Joined
 * @typedef {import('./types.js').Message} Message
 * @typedef {import('./types.js').MessageInfo} MessageInfo
 * @typedef {import('./types.js').PublishAck} PublishAck
 * @typedef {import('./types.js').RoomwireOptions} RoomwireOptions
 * @typedef {import('./types.js').StatusEvent} StatusEvent
 * @typedef {import('./wire.js').ErrorCode} ErrorCodeValue
 */

/** The vendored protobuf.js bundle is a UMD script: it registers itself on the global object. */
const protobuf = /** @type {any} */ (globalThis).protobuf;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** The wire types, built once per page from the compiled-in descriptor (no request). */
let wireTypes = /** @type {{ ClientFrame: any, ServerFrame: any } | null} */ (null);
function types() {
  if (wireTypes === null) {
    const root = protobuf.Root.fromJSON(descriptor);
    wireTypes = {
      ClientFrame: root.lookupType('roomwire.v1.ClientFrame'),
      ServerFrame: root.lookupType('roomwire.v1.ServerFrame'),
    };
  }
  return wireTypes;
}

/** uint64 fields decode as numbers (or Long objects when a page provides long.js). */
function num(/** @type {any} */ value) {
  if (typeof value === 'number') return value;
  if (value === null || value === undefined) return 0;
  return typeof value.toNumber === 'function' ? value.toNumber() : Number(value);
}

/** @param {string | Uint8Array | ArrayBuffer} payload */
function toBytes(payload) {
  if (payload instanceof Uint8Array) return payload;
  if (payload instanceof ArrayBuffer) return new Uint8Array(payload);
  return encoder.encode(String(payload));
}

/** @param {string} b64 */
function base64ToBytes(b64) {
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

/**
 * A random per-client prefix for client_msg_id: the node de-duplicates publishes per user (not
 * per session) for rooms.dedupe_window_ms, so ids must not repeat across a user's tabs or a
 * reload. crypto.getRandomValues, unlike crypto.randomUUID, exists on plain-http pages too.
 */
function randomPrefix() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * Why a request failed: the node refused it (`reason` 'node', `code` from ErrorCode), or it never
 * got an answer ('not_connected', 'connection_lost', 'timeout'; `code` 0). `retryable` says whether
 * the same request may succeed later; a publish is retried safely with the same clientMsgId.
 */
export class RoomwireError extends Error {
  /**
   * @param {string} message
   * @param {{ code?: number, reason: 'node' | 'not_connected' | 'connection_lost' | 'timeout', retryable: boolean }} details
   */
  constructor(message, { code = ErrorCode.UNSPECIFIED, reason, retryable }) {
    super(message);
    this.name = 'RoomwireError';
    /** @type {ErrorCodeValue} */
    this.code = /** @type {any} */ (code);
    this.reason = reason;
    this.retryable = retryable;
  }

  /** @param {any} error a decoded Error frame */
  static fromFrame(error) {
    return new RoomwireError(error.message, {
      code: error.code,
      reason: 'node',
      retryable: Boolean(error.retryable),
    });
  }
}

/** @param {Uint8Array} frame Protobuf varint length prefix + frame: the WebTransport stream framing. */
function delimit(frame) {
  const prefix = [];
  let n = frame.length;
  while (n >= 0x80) {
    prefix.push((n & 0x7f) | 0x80);
    n >>>= 7;
  }
  prefix.push(n);
  const out = new Uint8Array(prefix.length + frame.length);
  out.set(prefix, 0);
  out.set(frame, prefix.length);
  return out;
}

/** Splits length-delimited frames off the front of a growing buffer. */
class FrameReader {
  /** @param {number} maxFrame */
  constructor(maxFrame) {
    this.buf = new Uint8Array(0);
    this.maxFrame = maxFrame;
  }

  /** @param {Uint8Array} chunk */
  push(chunk) {
    const joined = new Uint8Array(this.buf.length + chunk.length);
    joined.set(this.buf, 0);
    joined.set(chunk, this.buf.length);
    this.buf = joined;
  }

  /** The next whole frame, or null when more bytes are needed. */
  next() {
    let len = 0;
    let shift = 0;
    for (let i = 0; i < this.buf.length && i < 10; i++) {
      const b = this.buf[i];
      len += (b & 0x7f) * 2 ** shift;
      shift += 7;
      if ((b & 0x80) === 0) {
        if (len > this.maxFrame) throw new Error(`frame of ${len} bytes is over the limit`);
        const start = i + 1;
        if (this.buf.length < start + len) return null;
        const frame = this.buf.slice(start, start + len);
        this.buf = this.buf.slice(start + len);
        return frame;
      }
    }
    if (this.buf.length >= 10) throw new Error('invalid length prefix');
    return null;
  }
}

/**
 * @callback FrameHandler
 * @param {Uint8Array} bytes
 * @param {boolean} datagram
 * @returns {void}
 */
/**
 * @callback CloseHandler
 * @param {number | null} code
 * @param {string} reason
 * @returns {void}
 */

/** WebTransport: one bidirectional stream for the session, datagrams beside it. */
class WebTransportConnection {
  /**
   * @param {string} base
   * @param {string} token
   * @param {FrameHandler} onFrame
   * @param {CloseHandler} onClose
   */
  static async open(base, token, onFrame, onClose) {
    const infoResponse = await fetch(new URL('/webtransport/certhash', base), { cache: 'no-store' });
    if (!infoResponse.ok) throw new Error(`certhash: HTTP ${infoResponse.status}`);
    const info = await infoResponse.json();
    const host = new URL(base).hostname;
    const url = new URL(`https://${host}:${info.port}${info.path}`);
    if (token) url.searchParams.set('token', token);
    const options = info.generated
      ? { serverCertificateHashes: [{ algorithm: 'sha-256', value: base64ToBytes(info.base64) }] }
      : {};
    const wt = new WebTransport(url.toString(), options);
    await wt.ready;
    const stream = await wt.createBidirectionalStream();
    const conn = new WebTransportConnection(wt, stream, onFrame, onClose);
    conn.pump();
    return conn;
  }

  /**
   * @param {WebTransport} wt
   * @param {WebTransportBidirectionalStream} stream
   * @param {FrameHandler} onFrame
   * @param {CloseHandler} onClose
   */
  constructor(wt, stream, onFrame, onClose) {
    /** @type {'webtransport'} */
    this.kind = 'webtransport';
    this.wt = wt;
    this.writer = stream.writable.getWriter();
    this.reader = stream.readable.getReader();
    this.datagramWriter = wt.datagrams.writable.getWriter();
    this.onFrame = onFrame;
    this.onClose = onClose;
    this.frames = new FrameReader(1 << 20);
  }

  async pump() {
    const datagrams = (async () => {
      const reader = this.wt.datagrams.readable.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        this.onFrame(value, true);
      }
    })().catch(() => {});
    let reason = 'closed';
    /** @type {number | null} */
    let code = null;
    try {
      for (;;) {
        const { value, done } = await this.reader.read();
        if (done) break;
        this.frames.push(value);
        let frame;
        while ((frame = this.frames.next()) !== null) this.onFrame(frame, false);
      }
      // The node finished its stream; finishing ours lets it close the session with its code.
      await this.writer.close().catch(() => {});
      /** @type {{ closeCode?: number, reason?: string }} */
      const info = await Promise.race([
        this.wt.closed,
        new Promise((resolve) => setTimeout(() => resolve({}), 3000)),
      ]);
      code = info.closeCode ?? null;
      reason = info.reason ?? reason;
    } catch (error) {
      reason = String(/** @type {any} */ (error)?.message ?? error);
      // A broken stream must not leave the session open on the node (it would stay a member).
      try {
        this.wt.close({ closeCode: 1000, reason: 'stream error' });
      } catch {}
    }
    await datagrams;
    this.onClose(code, reason);
  }

  /** @param {Uint8Array} frame */
  send(frame) {
    return this.writer.write(delimit(frame));
  }

  /**
   * A datagram when it fits the path, else the stream (unreliable frames may take either).
   * @param {Uint8Array} frame
   */
  sendUnreliable(frame) {
    const max = this.wt.datagrams.maxDatagramSize ?? 1024;
    if (frame.length <= max) return this.datagramWriter.write(frame);
    return this.send(frame);
  }

  close() {
    try {
      this.wt.close({ closeCode: 1000, reason: 'bye' });
    } catch {
      // Already closed.
    }
  }
}

/** WebSocket fallback: one binary message per frame (subprotocol roomwire.v1). */
class WebSocketConnection {
  /**
   * @param {string} base
   * @param {FrameHandler} onFrame
   * @param {CloseHandler} onClose
   * @returns {Promise<WebSocketConnection>}
   */
  static open(base, onFrame, onClose) {
    const url = new URL('/ws', base);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url.toString(), 'roomwire.v1');
      ws.binaryType = 'arraybuffer';
      let opened = false;
      ws.onopen = () => {
        opened = true;
        resolve(new WebSocketConnection(ws));
      };
      ws.onmessage = (event) => onFrame(new Uint8Array(event.data), false);
      ws.onclose = (event) => {
        if (!opened) reject(new Error(`websocket closed (${event.code})`));
        else onClose(event.code, event.reason);
      };
    });
  }

  /** @param {WebSocket} ws */
  constructor(ws) {
    /** @type {'websocket'} */
    this.kind = 'websocket';
    this.ws = ws;
  }

  /** @param {Uint8Array} frame */
  send(frame) {
    this.ws.send(frame);
    return Promise.resolve();
  }

  /** @param {Uint8Array} frame */
  sendUnreliable(frame) {
    return this.send(frame);
  }

  close() {
    this.ws.close(1000, 'bye');
  }
}

/**
 * @typedef {{ resolve: (frame: any) => void, reject: (error: RoomwireError) => void }} Pending
 */

export class RoomwireClient {
  /** @param {RoomwireOptions} [options] what each option means: types.d.ts */
  constructor(options = {}) {
    const base = options.url ?? globalThis.location?.origin;
    if (!base) throw new TypeError('RoomwireClient: options.url is required outside a page');
    /** The node's HTTP base URL. */
    this.url = base;
    this.token = options.token ?? '';
    this.clientName = options.clientName ?? 'roomwire-web/0.1';
    this.preferred = options.transport ?? 'auto';
    this.heartbeatMs = options.heartbeatMs ?? null;
    this.initialBackoffMs = options.initialBackoffMs ?? 250;
    this.maxBackoffMs = options.maxBackoffMs ?? 30000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10000;
    /** @type {WebTransportConnection | WebSocketConnection | null} */
    this.conn = null;
    /** @type {Connected | null} */
    this.connected = null;
    /** @type {ConnectionState} */
    this.status = 'idle';
    /** @type {Map<string, { epoch: number, seq: number }>} room -> last position seen */
    this.rooms = new Map();
    /** @type {Map<number, Pending>} request id -> its answer's callbacks */
    this.pending = new Map();
    this.nextRequest = 1;
    /** client_msg_id = `${idPrefix}-${counter}`: unique per client instance (see randomPrefix). */
    this.idPrefix = randomPrefix();
    this.idCounter = 0;
    /** @type {{ message: Function[], status: Function[], error: Function[], gap: Function[] }} */
    this.listeners = { message: [], status: [], error: [], gap: [] };
    /** @type {Promise<Connected> | null} the one connect loop in flight */
    this.connecting = null;
    this.upSince = 0;
    this.attempt = 0;
    this.closedByUser = false;
    /** @type {ReturnType<typeof setInterval> | undefined} */
    this.heartbeat = undefined;
    /** The wait before the next reconnect attempt, cut short by close(). */
    /** @type {{ timer: ReturnType<typeof setTimeout>, wake: () => void } | null} */
    this.retryWait = null;
    /** @type {number | null} */
    this.reconnectAfter = null;
    /** Sessions opened so far (1 after the first connect; more after reconnects). */
    this.sessions = 0;
  }

  /** Which transport the session runs on right now ('webtransport', 'websocket' or null). */
  get transport() {
    return this.conn?.kind ?? null;
  }

  /** 'idle' (never connected), 'connecting', 'connected', 'reconnecting' or 'closed' (by close()). */
  get state() {
    return this.status;
  }

  /** A fresh client_msg_id: this client's random prefix and a counter. */
  newMessageId() {
    this.idCounter += 1;
    return `${this.idPrefix}-${this.idCounter}`;
  }

  /**
   * cb(message, { unreliable, datagram, transport }) for every Message frame.
   * @param {(message: Message, info: MessageInfo) => void} cb
   */
  onMessage(cb) {
    return this.listen('message', cb);
  }

  /**
   * cb({ state, transport, detail, delay, retryAt }) on connecting / connected / reconnecting / closed.
   * @param {(event: StatusEvent) => void} cb
   */
  onStatus(cb) {
    return this.listen('status', cb);
  }

  /**
   * cb({ room, fromSeq, toSeq, epochChanged }) when messages of a joined room were skipped: on a
   * reconnect, or when the room's owner in a mesh crashed and the room restarted in a new epoch
   * (`toSeq` null: an unknown number). The node does not replay them yet (history is a later
   * feature), so the application can refetch.
   * @param {(gap: GapEvent) => void} cb
   */
  onGap(cb) {
    return this.listen('gap', cb);
  }

  /**
   * cb(error) for Error frames that answer no request, and for rooms that could not be rejoined.
   * @param {(error: RoomwireError) => void} cb
   */
  onError(cb) {
    return this.listen('error', cb);
  }

  /**
   * @param {'message' | 'status' | 'error' | 'gap'} kind
   * @param {Function} cb
   * @returns {() => void} removes the listener
   */
  listen(kind, cb) {
    this.listeners[kind].push(cb);
    return () => {
      this.listeners[kind] = this.listeners[kind].filter((other) => other !== cb);
    };
  }

  /**
   * @param {'message' | 'status' | 'error' | 'gap'} kind
   * @param {...any} args
   */
  emit(kind, ...args) {
    for (const cb of this.listeners[kind]) {
      try {
        cb(...args);
      } catch (error) {
        console.error(error);
      }
    }
  }

  /**
   * @param {ConnectionState} state
   * @param {{ detail?: unknown, delay?: number }} [extra]
   */
  setStatus(state, extra = {}) {
    this.status = state;
    /** @type {StatusEvent} */
    const event = { state, transport: this.transport, detail: extra.detail };
    if (extra.delay !== undefined) {
      event.delay = extra.delay;
      event.retryAt = Date.now() + extra.delay;
    }
    this.emit('status', event);
  }

  /**
   * Connects, retrying with backoff until it works or close() is called. There is only ever one
   * such loop: a second call returns the first one's promise, and a call while connected
   * resolves at once. A refused token (UNAUTHORIZED) is final: set a new `client.token` and call
   * connect() again.
   * @returns {Promise<Connected>}
   */
  connect() {
    this.closedByUser = false;
    if (this.status === 'connected' && this.conn !== null && this.connected !== null) {
      return Promise.resolve(this.connected);
    }
    this.connecting ??= this.connectLoop().finally(() => {
      this.connecting = null;
    });
    return this.connecting;
  }

  /** @returns {Promise<Connected>} */
  async connectLoop() {
    for (;;) {
      try {
        return await this.open();
      } catch (error) {
        if (this.closedByUser) throw error;
        if (/** @type {any} */ (error)?.code === ErrorCode.UNAUTHORIZED) {
          this.setStatus('closed', { detail: 'unauthorized: a new token is needed' });
          throw error;
        }
        const delay = this.backoff();
        this.setStatus('reconnecting', { detail: String(error), delay });
        await this.sleep(delay);
        if (this.closedByUser) {
          throw new RoomwireError('closed', { reason: 'not_connected', retryable: false });
        }
      }
    }
  }

  /**
   * Waits before a reconnect attempt; close() ends the wait early.
   * @param {number} delay
   * @returns {Promise<void>}
   */
  sleep(delay) {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this.retryWait = null;
        resolve();
      };
      const timer = setTimeout(wake, delay);
      this.retryWait = { timer, wake };
    });
  }

  /** Exponential backoff with full jitter: uniform in [d/2, d], d doubling up to the maximum. */
  backoff() {
    const ceiling = Math.min(this.maxBackoffMs, this.initialBackoffMs * 2 ** this.attempt);
    this.attempt += 1;
    return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
  }

  /** @returns {Promise<Connected>} */
  async open() {
    this.setStatus('connecting');
    /** @type {FrameHandler} */
    const onFrame = (bytes, datagram) => this.onFrame(bytes, datagram);
    /** @type {WebTransportConnection | WebSocketConnection | null} */
    let conn = null;
    // Bound to this connection: a late close of an older one must not tear down the current one.
    /** @type {CloseHandler} */
    const onClose = (code, reason) => this.onClose(conn, code, reason);
    const tryWebTransport =
      this.preferred !== 'websocket' && typeof globalThis.WebTransport === 'function';
    if (tryWebTransport) {
      try {
        conn = await WebTransportConnection.open(this.url, this.token, onFrame, onClose);
      } catch (error) {
        if (this.preferred === 'webtransport') throw error;
        console.warn('roomwire: WebTransport failed, falling back to WebSocket:', error);
      }
    }
    conn ??= await WebSocketConnection.open(this.url, onFrame, onClose);
    if (this.closedByUser) {
      conn.close();
      throw new RoomwireError('closed', { reason: 'not_connected', retryable: false });
    }
    this.conn = conn;
    const resume = {
      rooms: [...this.rooms].map(([room, pos]) => ({ room, epoch: pos.epoch, seq: pos.seq })),
    };
    let reply;
    try {
      reply = await this.request({
        connect: { token: this.token, clientName: this.clientName, resume },
      });
    } catch (error) {
      // Refused or timed out: this connection is done; the connect loop decides what is next.
      this.conn = null;
      conn.close();
      throw error;
    }
    const c = reply.connected;
    const limits = c.limits ?? {};
    /** @type {Connected} */
    const connected = {
      sessionId: c.sessionId,
      nodeId: c.nodeId,
      region: c.region,
      userId: c.userId,
      heartbeatIntervalMs: c.heartbeatIntervalMs,
      idleTimeoutMs: c.idleTimeoutMs,
      tokenExpiresAtMs: num(c.tokenExpiresAtMs),
      limits: {
        maxFrameBytes: limits.maxFrameBytes ?? 0,
        maxRooms: limits.maxRooms ?? 0,
        maxRoomNameBytes: limits.maxRoomNameBytes ?? 0,
        sendQueueFrames: limits.sendQueueFrames ?? 0,
        sendQueueBytes: limits.sendQueueBytes ?? 0,
        maxViolations: limits.maxViolations ?? 0,
        framesPerSecond: limits.framesPerSecond ?? 0,
        bytesPerSecond: limits.bytesPerSecond ?? 0,
      },
    };
    this.connected = connected;
    this.sessions += 1;
    // The backoff resets only once a session has stayed up a while (see onClose).
    this.upSince = Date.now();
    this.startHeartbeat();
    // Rejoin what was joined before a reconnect, and say what was missed in between.
    for (const [room, last] of this.rooms) {
      try {
        const joined = (await this.request({ join: { room } })).joined;
        const epoch = num(joined.epoch);
        const seq = num(joined.seq);
        if (last.seq > 0 && (epoch !== last.epoch || seq > last.seq)) {
          this.emit('gap', { room, fromSeq: last.seq + 1, toSeq: seq, epochChanged: epoch !== last.epoch });
        }
        this.rooms.set(room, { epoch, seq });
      } catch (error) {
        if (this.conn !== conn) break;
        this.emit('error', error);
      }
    }
    // Lost while rejoining: onClose left the retry to this loop.
    if (this.conn !== conn) {
      throw new RoomwireError('connection lost while rejoining', { reason: 'connection_lost', retryable: true });
    }
    this.setStatus('connected', { detail: connected });
    return connected;
  }

  startHeartbeat() {
    clearInterval(this.heartbeat);
    const every = this.heartbeatMs ?? Math.max(1000, (this.connected?.heartbeatIntervalMs || 25000) / 2);
    this.heartbeat = setInterval(() => {
      // A Ping unanswered within two intervals means the path is dead: reconnect.
      this.request({ ping: { nonce: Date.now() } }, every * 2).catch(() => this.conn?.close());
    }, every);
  }

  /**
   * @param {Uint8Array} bytes
   * @param {boolean} datagram
   */
  onFrame(bytes, datagram) {
    let frame;
    try {
      frame = types().ServerFrame.decode(bytes);
    } catch (error) {
      console.warn('roomwire: undecodable frame', error);
      return;
    }
    const id = num(frame.requestId);
    const pending = id !== 0 ? this.pending.get(id) : undefined;
    if (pending) {
      this.pending.delete(id);
      if (frame.kind === 'error') pending.reject(RoomwireError.fromFrame(frame.error));
      else pending.resolve(frame);
      return;
    }
    switch (frame.kind) {
      case 'message': {
        const m = frame.message;
        const payload = m.payload;
        /** @type {Message} */
        const message = {
          room: m.room,
          epoch: num(m.epoch),
          seq: num(m.seq),
          publisher: m.publisher,
          payload,
          clientMsgId: m.clientMsgId,
          serverTimeMs: num(m.serverTimeMs),
          text: () => decoder.decode(payload),
        };
        if (message.seq > 0 && this.rooms.has(message.room)) {
          this.rooms.set(message.room, { epoch: message.epoch, seq: message.seq });
        }
        this.emit('message', message, { unreliable: message.seq === 0, datagram, transport: this.transport });
        break;
      }
      case 'epochChanged': {
        // The room's owner crashed and a new one restarted the room's sequence: whatever of the
        // old epoch after previousSeq this client did not get is not coming.
        const e = frame.epochChanged;
        const last = this.rooms.get(e.room);
        if (last) {
          this.emit('gap', {
            room: e.room,
            fromSeq: Math.min(last.seq, num(e.previousSeq)) + 1,
            toSeq: null,
            epochChanged: true,
          });
          this.rooms.set(e.room, { epoch: num(e.epoch), seq: 0 });
        }
        break;
      }
      case 'goAway':
        // The node drains: reconnect (elsewhere) after the delay it asks for.
        this.reconnectAfter = frame.goAway.reconnectAfterMs;
        break;
      case 'error':
        this.emit('error', RoomwireError.fromFrame(frame.error));
        break;
      default:
        break;
    }
  }

  /**
   * @param {WebTransportConnection | WebSocketConnection | null} conn
   * @param {number | null} code
   * @param {string} reason
   */
  onClose(conn, code, reason) {
    if (conn === null || conn !== this.conn) return; // an older or never-established connection
    clearInterval(this.heartbeat);
    this.conn = null;
    this.connected = null;
    if (Date.now() - this.upSince > 10000) this.attempt = 0;
    const lost = new RoomwireError(`closed (${code}): ${reason}`, { reason: 'connection_lost', retryable: true });
    for (const { reject } of this.pending.values()) reject(lost);
    this.pending.clear();
    if (this.closedByUser) {
      this.setStatus('closed', { detail: { code, reason } });
      return;
    }
    // Lost while the connect loop was still setting the session up: the loop retries.
    if (this.connecting !== null) return;
    const delay = Math.max(this.reconnectAfter ?? 0, this.backoff());
    this.reconnectAfter = null;
    this.setStatus('reconnecting', { detail: { code, reason }, delay });
    this.sleep(delay).then(() => {
      if (!this.closedByUser) this.connect().catch(() => {});
    });
  }

  /** @param {object} fields */
  encode(fields) {
    const { ClientFrame } = types();
    return /** @type {Uint8Array} */ (ClientFrame.encode(ClientFrame.fromObject(fields)).finish());
  }

  /**
   * @param {object} kind
   * @param {number} [timeoutMs]
   * @returns {Promise<any>} the decoded ServerFrame that answers it
   */
  request(kind, timeoutMs = this.requestTimeoutMs) {
    const conn = this.conn;
    if (conn === null) {
      return Promise.reject(new RoomwireError('not connected', { reason: 'not_connected', retryable: true }));
    }
    const requestId = this.nextRequest++;
    const bytes = this.encode({ requestId, ...kind });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(requestId);
        reject(new RoomwireError('request timed out', { reason: 'timeout', retryable: true }));
      }, timeoutMs);
      this.pending.set(requestId, {
        resolve: (frame) => {
          clearTimeout(timer);
          resolve(frame);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
      conn.send(bytes).catch((/** @type {unknown} */ error) => {
        this.pending.delete(requestId);
        clearTimeout(timer);
        reject(new RoomwireError(`send failed: ${error}`, { reason: 'connection_lost', retryable: true }));
      });
    });
  }

  /**
   * Joins a room; its messages follow from `seq + 1`. Rejoined on its own after a reconnect.
   * @param {string} room
   * @returns {Promise<Joined>}
   */
  async join(room) {
    const joined = (await this.request({ join: { room } })).joined;
    const position = { epoch: num(joined.epoch), seq: num(joined.seq) };
    this.rooms.set(room, position);
    return { room: joined.room, ...position };
  }

  /** @param {string} room */
  async leave(room) {
    this.rooms.delete(room);
    await this.request({ leave: { room } });
  }

  /**
   * Reliable, sequenced publish; resolves with the owner's acknowledgement. `duplicate` is true
   * when the node had already sequenced this clientMsgId (a retry): it was not delivered again,
   * and epoch and seq are the original's. Retry a failed publish with the same clientMsgId.
   * @param {string} room
   * @param {string | Uint8Array | ArrayBuffer} payload
   * @param {string} [clientMsgId] default: a fresh newMessageId()
   * @returns {Promise<PublishAck>}
   */
  async publish(room, payload, clientMsgId = this.newMessageId()) {
    const frame = await this.request({
      publish: { room, payload: toBytes(payload), clientMsgId, unreliable: false },
    });
    const ack = frame.publishAck;
    return {
      room: ack.room,
      clientMsgId: ack.clientMsgId,
      epoch: num(ack.epoch),
      seq: num(ack.seq),
      duplicate: ack.duplicate === true,
    };
  }

  /**
   * Unreliable publish (a datagram over WebTransport): no sequence, no acknowledgement; dropped
   * when not connected.
   * @param {string} room
   * @param {string | Uint8Array | ArrayBuffer} payload
   * @returns {Promise<void>}
   */
  publishUnreliable(room, payload) {
    if (!this.conn) return Promise.resolve();
    const bytes = this.encode({ publish: { room, payload: toBytes(payload), unreliable: true } });
    return this.conn.sendUnreliable(bytes).catch(() => {});
  }

  /** Ends the session and stops reconnecting; pending requests fail with 'connection_lost'. */
  close() {
    this.closedByUser = true;
    clearInterval(this.heartbeat);
    this.retryWait?.wake();
    if (this.conn) this.conn.close();
    else if (this.status !== 'closed') this.setStatus('closed');
  }
}
