// @ts-check
// roomwire browser client, published as the npm package @roomwire/client and served by every node
// at /client/roomwire.js: WebTransport first (trusting the node's generated certificate through
// serverCertificateHashes), WebSocket as the fallback, reconnect with exponential backoff and
// jitter, application heartbeats (Ping frames), and rooms resumed where they left off after a
// reconnect or a page reload (the node replays what was missed, or says it cannot: a reset).
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
//   client.onReset(({ room, oldest }) => refetch(room, oldest)); // missed messages no longer kept
//   const page = await client.history('lobby', { limit: 50 }); // newest first
//   await client.join('lobby', { presence: true, presenceInfo: 'Alice' }); // who is in the room
//   client.onPresence(({ room, users, members }) => show(room, users, members));
//   client.onPresenceJoin(({ member }) => log(`${member.infoText || member.userId} joined`));

import './vendor/protobuf.min.js';
import { CloseCode, ErrorCode, descriptor } from './wire.js';

export { CloseCode, ErrorCode };

/**
 * @typedef {import('./types.js').Connected} Connected
 * @typedef {import('./types.js').ConnectionState} ConnectionState
 * @typedef {import('./types.js').GapEvent} GapEvent
 * @typedef {import('./types.js').HistoryOptions} HistoryOptions
 * @typedef {import('./types.js').HistoryPage} HistoryPage
 * @typedef {import('./types.js').Joined} Joined
 * @typedef {import('./types.js').JoinOptions} JoinOptions
 * @typedef {import('./types.js').Message} Message
 * @typedef {import('./types.js').MessageInfo} MessageInfo
 * @typedef {import('./types.js').Presence} Presence
 * @typedef {import('./types.js').PresenceJoinEvent} PresenceJoinEvent
 * @typedef {import('./types.js').PresenceLeaveEvent} PresenceLeaveEvent
 * @typedef {import('./types.js').PresenceMember} PresenceMember
 * @typedef {import('./types.js').PresenceStats} PresenceStats
 * @typedef {import('./types.js').PublishAck} PublishAck
 * @typedef {import('./types.js').ResetEvent} ResetEvent
 * @typedef {import('./types.js').RoomPosition} RoomPosition
 * @typedef {import('./types.js').StorageLike} StorageLike
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
 * `bytes` random bytes as hex. crypto.getRandomValues, unlike crypto.randomUUID, exists on
 * plain-http pages (insecure contexts) too; Math.random only where there is no Web Crypto at all.
 * @param {number} bytes
 */
function randomHex(bytes) {
  const out = new Uint8Array(bytes);
  if (typeof globalThis.crypto?.getRandomValues === 'function') crypto.getRandomValues(out);
  else for (let i = 0; i < bytes; i++) out[i] = Math.floor(Math.random() * 256);
  return Array.from(out, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * A random per-client prefix for client_msg_id: the node de-duplicates publishes per user (not
 * per session) for rooms.dedupe_window_ms, so ids must not repeat across a user's tabs or a
 * reload.
 */
function randomPrefix() {
  return randomHex(8);
}

/** What Connect.device_id accepts. */
const DEVICE_ID = /^[A-Za-z0-9._-]{1,64}$/;
/** The localStorage key of the generated device id (one per browser profile and origin). */
const DEVICE_ID_KEY = 'roomwire.deviceId';

/**
 * A Web Storage of the page (sessionStorage, localStorage), or null where there is none or it
 * is refused (Node, a sandboxed frame, storage disabled: touching it may throw).
 * @param {'sessionStorage' | 'localStorage'} name
 * @returns {StorageLike | null}
 */
function webStorage(name) {
  try {
    return /** @type {any} */ (globalThis)[name] ?? null;
  } catch {
    return null;
  }
}

/**
 * The device id to send: the option when given (null: none), else the one kept in localStorage,
 * generated the first time. Without localStorage none is sent: an id that changes with every
 * client would make the node remember a new device each time.
 * @param {string | null | undefined} option
 */
function deviceIdFor(option) {
  if (option === null) return null;
  if (option !== undefined) {
    if (!DEVICE_ID.test(option)) {
      throw new TypeError('RoomwireClient: deviceId must be 1 to 64 characters of [A-Za-z0-9._-]');
    }
    return option;
  }
  const store = webStorage('localStorage');
  if (store === null) return null;
  try {
    const kept = store.getItem(DEVICE_ID_KEY);
    if (kept !== null && DEVICE_ID.test(kept)) return kept;
    const fresh = randomHex(16);
    store.setItem(DEVICE_ID_KEY, fresh);
    return fresh;
  } catch {
    return null;
  }
}

/**
 * Whose positions a storage entry holds: the token's user (a JWT's `sub`; in the node's
 * development mode the token is the user id), so two users signing in within one tab never
 * resume each other's rooms. Read without verifying: it only names a storage key.
 * @param {string} token
 */
function tokenUser(token) {
  const parts = token.split('.');
  if (parts.length === 3) {
    try {
      const json = atob(parts[1].replace(/-/g, '+').replace(/_/g, '/'));
      const sub = JSON.parse(json).sub;
      if (typeof sub === 'string') return sub;
    } catch {
      // Not a JWT after all: the token itself names the user.
    }
  }
  return token;
}

/**
 * Why a request failed: the node refused it (`reason` 'node', `code` from ErrorCode), or it never
 * got an answer ('not_connected', 'connection_lost', 'timeout'; `code` 0). `retryable` says whether
 * the same request may succeed later; a publish is retried safely with the same clientMsgId.
 */
export class RoomwireError extends Error {
  /**
   * @param {string} message
   * @param {{ code?: number, reason: 'node' | 'not_connected' | 'connection_lost' | 'timeout', retryable: boolean, room?: string }} details
   */
  constructor(message, { code = ErrorCode.UNSPECIFIED, reason, retryable, room }) {
    super(message);
    this.name = 'RoomwireError';
    /** @type {ErrorCodeValue} */
    this.code = /** @type {any} */ (code);
    this.reason = reason;
    this.retryable = retryable;
    /** The room it is about, when one request covered several (a room not resumed); else null. */
    this.room = room || null;
  }

  /** @param {any} error a decoded Error frame */
  static fromFrame(error) {
    return new RoomwireError(error.message, {
      code: error.code,
      reason: 'node',
      retryable: Boolean(error.retryable),
      room: error.room,
    });
  }
}

/**
 * A decoded bytes field: protobuf.js gives an absent (empty) one as a shared empty Array, which
 * TextDecoder refuses.
 * @param {any} value
 * @returns {Uint8Array}
 */
function bytesOf(value) {
  return value instanceof Uint8Array ? value : new Uint8Array(0);
}

/**
 * A decoded Message frame as the application gets it.
 * @param {any} m
 * @returns {Message}
 */
function toMessage(m) {
  const payload = bytesOf(m.payload);
  return {
    room: m.room,
    epoch: num(m.epoch),
    seq: num(m.seq),
    publisher: m.publisher,
    payload,
    clientMsgId: m.clientMsgId,
    serverTimeMs: num(m.serverTimeMs),
    text: () => decoder.decode(payload),
  };
}

/**
 * A decoded PresenceMember as the application gets it.
 * @param {any} m
 * @returns {PresenceMember}
 */
function toMember(m) {
  const info = bytesOf(m.info);
  return { userId: m.userId, sessions: m.sessions ?? 0, info, infoText: decoder.decode(info) };
}

/**
 * A decoded PresenceDiff, numbers as numbers.
 * @typedef {{
 *   room: string, epoch: number, version: number, joined: PresenceMember[], left: string[],
 *   users: number, sessions: number, truncated: boolean, reset: boolean,
 * }} PresenceDiff
 * @param {any} d
 * @returns {PresenceDiff}
 */
function toPresenceDiff(d) {
  return {
    room: d.room,
    epoch: num(d.epoch),
    version: num(d.version),
    joined: (d.joined ?? []).map(toMember),
    left: d.left ?? [],
    users: d.users ?? 0,
    sessions: d.sessions ?? 0,
    truncated: d.truncated === true,
    reset: d.reset === true,
  };
}

/**
 * A room's presence as this client keeps it (rooms joined with `presence`): the member list at
 * (epoch, version), brought forward by the node's diffs in version order.
 * @typedef {{
 *   room: string,
 *   loaded: boolean,
 *   epoch: number,
 *   version: number,
 *   users: number,
 *   sessions: number,
 *   truncated: boolean,
 *   members: Map<string, PresenceMember>,
 *   buffer: PresenceDiff[] | null,
 *   generation: number,
 *   retries: number,
 *   timer: ReturnType<typeof setTimeout> | undefined,
 * }} PresenceView
 * `buffer` is non-null while the list is being (re)fetched: the diffs arriving meanwhile wait
 * there and those newer than the fetched list are applied after it. `generation` tells the
 * current fetch from older ones still answering.
 */

/**
 * @param {{ userId: string }} a
 * @param {{ userId: string }} b
 */
function byUserId(a, b) {
  return a.userId < b.userId ? -1 : a.userId > b.userId ? 1 : 0;
}

/**
 * What the application sees of a view.
 * @param {PresenceView} view
 * @returns {Presence}
 */
function presenceOf(view) {
  return {
    room: view.room,
    epoch: view.epoch,
    version: view.version,
    users: view.users,
    sessions: view.sessions,
    members: [...view.members.values()].sort(byUserId),
    truncated: view.truncated,
  };
}

/** Users asked for per presence page (the node's most). */
const PRESENCE_PAGE = 1000;
/** A presence that changes owner while its pages are read is read again at most this often. */
const PRESENCE_READ_ATTEMPTS = 5;

/**
 * A (epoch, seq) pair as a position; null for (0, 0), which the node sends for "none".
 * @param {any} epoch
 * @param {any} seq
 * @returns {RoomPosition | null}
 */
function positionOrNull(epoch, seq) {
  const p = { epoch: num(epoch), seq: num(seq) };
  return p.epoch === 0 && p.seq === 0 ? null : p;
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

/**
 * The rooms a Connect resumes, each until it is answered (a Joined, or an Error naming it, both
 * carrying the Connect's request id, after the room's replayed messages).
 * @typedef {{
 *   requestId: number,
 *   since: Map<string, RoomPosition>,
 *   done: () => void,
 *   fail: (error: RoomwireError) => void,
 *   touch: () => void,
 * }} Resuming
 */

/**
 * The events listeners can be registered for.
 * @typedef {'message' | 'status' | 'error' | 'reset' | 'gap' | 'presence' | 'presencejoin' | 'presenceleave'} ListenerKind
 */

/** The sessionStorage key prefix of the rooms' positions (one entry per node and user). */
const POSITIONS_KEY = 'roomwire.positions';
/** Positions are written at most this often (and at once when the page goes away). */
const SAVE_DELAY_MS = 200;

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
    /** The id sent as Connect.device_id (offline delivery of the user room), or null. */
    this.deviceId = deviceIdFor(options.deviceId);
    /** @type {WebTransportConnection | WebSocketConnection | null} */
    this.conn = null;
    /** @type {Connected | null} */
    this.connected = null;
    /** @type {ConnectionState} */
    this.status = 'idle';
    /**
     * The joined rooms, each with the position of the last message delivered to the application
     * (or, before any, where it joined): what a reconnect resumes from.
     * @type {Map<string, RoomPosition>}
     */
    this.rooms = new Map();
    /**
     * The last known position of every room joined and not left (also rooms a resume could not
     * rejoin), so a later join() continues from it.
     * @type {Map<string, RoomPosition>}
     */
    this.positions = new Map();
    /** Rooms whose missed messages are being replayed (a join with a position, a resume). */
    this.catchingUp = new Set();
    /** @type {Resuming | null} the resume of the Connect in flight */
    this.resuming = null;
    /** @type {StorageLike | null} where positions outlive the page (sessionStorage by default) */
    this.storage = options.storage === undefined ? webStorage('sessionStorage') : options.storage;
    /** @type {Map<string, RoomPosition | null>} positions not written yet (null: forget it) */
    this.unsaved = new Map();
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.saveTimer = undefined;
    /** @type {Map<number, Pending>} request id -> its answer's callbacks */
    this.pending = new Map();
    this.nextRequest = 1;
    /** client_msg_id = `${idPrefix}-${counter}`: unique per client instance (see randomPrefix). */
    this.idPrefix = randomPrefix();
    this.idCounter = 0;
    /** @type {Record<ListenerKind, Function[]>} */
    this.listeners = {
      message: [], status: [], error: [], reset: [], gap: [], presence: [], presencejoin: [], presenceleave: [],
    };
    /**
     * The presence of each room joined with `presence` (see PresenceView).
     * @type {Map<string, PresenceView>}
     */
    this.presenceViews = new Map();
    /** Users asked for per GetPresence page. */
    this.presencePageSize = PRESENCE_PAGE;
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
    // A page going away (a reload, a navigation) writes its positions first: the next page
    // resumes exactly after the last message this one showed. Listened to from connect() to
    // close().
    this.onPageHide = () => {
      this.savePositions();
      this.flushSeen();
    };
    /**
     * With a device id: the last message of the user room handed to the app, not yet reported.
     * @type {{ room: string, epoch: number, seq: number } | null}
     */
    this.unreported = null;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.seenTimer = null;
  }

  /**
   * Tells the node how far this device has read its user room (`seen`), so its next connection
   * gets only what follows (offline delivery). Reported about once a second, and on close.
   */
  flushSeen() {
    if (this.seenTimer !== null) clearTimeout(this.seenTimer);
    this.seenTimer = null;
    const position = this.unreported;
    if (position === null || !this.conn) return;
    this.unreported = null;
    this.conn.send(this.encode({ requestId: this.nextRequest++, seen: position })).catch(() => {
      // Not reported: the message may come again on the next connection, never lost.
    });
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
   * cb(message, { unreliable, datagram, transport, replayed }) for every Message frame, each
   * sequenced message once.
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
   * cb({ room, reason, since, position, oldest }) when a joined room continues without some
   * messages this client missed: they are older than what the room keeps ('not_kept'), or the
   * room restarted its numbering in a new epoch ('epoch_changed').
   * @param {(reset: ResetEvent) => void} cb
   */
  onReset(cb) {
    return this.listen('reset', cb);
  }

  /**
   * Deprecated (use onReset): cb({ room, fromSeq, toSeq, epochChanged }) on every reset.
   * @param {(gap: GapEvent) => void} cb
   */
  onGap(cb) {
    return this.listen('gap', cb);
  }

  /**
   * cb(error) for Error frames that answer no request, for rooms a reconnect could not
   * resume (`error.room`), and for the presence of a room joined with `presence` that cannot be
   * kept (PRESENCE_OFF: the room keeps none).
   * @param {(error: RoomwireError) => void} cb
   */
  onError(cb) {
    return this.listen('error', cb);
  }

  /**
   * cb(presence) for each room joined with `presence`: its whole member list and counts, once
   * fetched and after every change (a diff applied, a list fetched again).
   * @param {(presence: Presence) => void} cb
   */
  onPresence(cb) {
    return this.listen('presence', cb);
  }

  /**
   * cb({ room, member }) when a user comes into a room whose presence this client keeps (the
   * users already there when the list is first fetched are not announced).
   * @param {(event: PresenceJoinEvent) => void} cb
   */
  onPresenceJoin(cb) {
    return this.listen('presencejoin', cb);
  }

  /**
   * cb({ room, userId, member }) when a user leaves a room whose presence this client keeps
   * (after the node's grace period: a quick reconnect or reload is not a leave).
   * @param {(event: PresenceLeaveEvent) => void} cb
   */
  onPresenceLeave(cb) {
    return this.listen('presenceleave', cb);
  }

  /**
   * @param {ListenerKind} kind
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
   * @param {ListenerKind} kind
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

  /** @param {ResetEvent} reset */
  emitReset(reset) {
    this.emit('reset', reset);
    const { room, since, position } = reset;
    const epochChanged = since.epoch !== position.epoch;
    this.emit('gap', { room, fromSeq: since.seq + 1, toSeq: epochChanged ? null : position.seq, epochChanged });
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

  /** The storage entry of this node and user (see tokenUser). */
  positionsKey() {
    let node = this.url;
    try {
      node = new URL(this.url).origin;
    } catch {
      // Kept as given.
    }
    return `${POSITIONS_KEY} ${node} ${tokenUser(this.token)}`;
  }

  /** @returns {Record<string, unknown>} the positions kept in storage, by room */
  storedPositions() {
    if (this.storage === null) return {};
    try {
      const parsed = JSON.parse(this.storage.getItem(this.positionsKey()) ?? '{}');
      return parsed !== null && typeof parsed === 'object' ? parsed : {};
    } catch {
      return {};
    }
  }

  /**
   * Where this client (or an earlier page of this tab) left `room`, if it knows.
   * @param {string} room
   * @returns {RoomPosition | null}
   */
  lastPosition(room) {
    const known = this.positions.get(room);
    if (known !== undefined) return known;
    const unsaved = this.unsaved.get(room);
    if (unsaved !== undefined) return unsaved;
    const kept = this.storedPositions()[room];
    const valid = (/** @type {unknown} */ n) => Number.isSafeInteger(n) && /** @type {number} */ (n) >= 0;
    if (Array.isArray(kept) && kept.length === 2 && valid(kept[0]) && valid(kept[1])) {
      return { epoch: kept[0], seq: kept[1] };
    }
    return null;
  }

  /**
   * The position of the last message of `room` the application got (or where it joined).
   * @param {string} room
   * @param {RoomPosition} position
   */
  setPosition(room, position) {
    this.rooms.set(room, position);
    this.positions.set(room, position);
    this.remember(room, position);
  }

  /**
   * Schedules writing a position (null: removing it) to the storage.
   * @param {string} room
   * @param {RoomPosition | null} position
   */
  remember(room, position) {
    if (this.storage === null) return;
    this.unsaved.set(room, position);
    this.saveTimer ??= setTimeout(() => this.savePositions(), SAVE_DELAY_MS);
  }

  /** Writes the unsaved positions, merged with what other clients of this tab kept there. */
  savePositions() {
    clearTimeout(this.saveTimer);
    this.saveTimer = undefined;
    if (this.storage === null || this.unsaved.size === 0) return;
    const all = this.storedPositions();
    for (const [room, position] of this.unsaved) {
      if (position === null) delete all[room];
      else all[room] = [position.epoch, position.seq];
    }
    this.unsaved.clear();
    try {
      if (Object.keys(all).length === 0) this.storage.removeItem(this.positionsKey());
      else this.storage.setItem(this.positionsKey(), JSON.stringify(all));
    } catch {
      // Full or refused: positions then last as long as this client.
    }
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
    if (this.storage !== null && typeof globalThis.addEventListener === 'function') {
      globalThis.addEventListener('pagehide', this.onPageHide);
    }
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

  /**
   * Exponential backoff with jitter ("equal jitter"): uniform in [d/2, d], d doubling from
   * initialBackoffMs up to maxBackoffMs (tests/browser/backoff.mjs checks the distribution).
   */
  backoff() {
    const ceiling = Math.min(this.maxBackoffMs, this.initialBackoffMs * 2 ** this.attempt);
    this.attempt += 1;
    return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
  }

  /**
   * Follows the answers to a Connect that resumes `since`'s rooms; resolves once each room is
   * answered. A catch-up may be long (it is paced by the send queue), so the timeout counts from
   * the last sign of progress, not from the start.
   * @param {number} requestId
   * @param {Map<string, RoomPosition>} since
   * @returns {Promise<void>}
   */
  trackResume(requestId, since) {
    return new Promise((resolve, reject) => {
      /** @type {ReturnType<typeof setTimeout> | undefined} */
      let timer;
      const end = () => {
        clearTimeout(timer);
        if (this.resuming === resuming) this.resuming = null;
        for (const room of since.keys()) this.catchingUp.delete(room);
      };
      /** @type {Resuming} */
      const resuming = {
        requestId,
        since,
        done: () => {
          end();
          resolve();
        },
        fail: (error) => {
          end();
          reject(error);
        },
        touch: () => {
          clearTimeout(timer);
          timer = setTimeout(() => {
            resuming.fail(new RoomwireError('rooms not resumed in time', { reason: 'timeout', retryable: true }));
          }, this.requestTimeoutMs);
        },
      };
      this.resuming = resuming;
      for (const room of since.keys()) this.catchingUp.add(room);
      resuming.touch();
    });
  }

  /**
   * A Joined or Error answering the Connect for one resumed room.
   * @param {any} frame
   */
  onResumed(frame) {
    const resuming = /** @type {Resuming} */ (this.resuming);
    if (frame.kind === 'joined') {
      const room = frame.joined.room;
      const since = resuming.since.get(room);
      resuming.since.delete(room);
      this.catchingUp.delete(room);
      if (since !== undefined) this.applyJoined(room, frame.joined, since);
    } else {
      const error = RoomwireError.fromFrame(frame.error);
      if (error.room !== null) {
        // Not a member any more (e.g. the token no longer allows it): the application is told;
        // its position is kept, so joining again later misses nothing the room still keeps.
        resuming.since.delete(error.room);
        this.catchingUp.delete(error.room);
        this.rooms.delete(error.room);
      }
      this.emit('error', error);
    }
    resuming.touch();
    if (resuming.since.size === 0) resuming.done();
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
    // Every joined room resumes from its position within the Connect: one round trip, on
    // whichever node and transport this is.
    const since = new Map(this.rooms);
    const requestId = this.nextRequest++;
    const resumed = since.size > 0 ? this.trackResume(requestId, since) : Promise.resolve();
    resumed.catch(() => {}); // awaited below, unless the Connect itself fails first
    // Rooms whose presence is kept get their diffs again; their lists are fetched anew once
    // the rooms are back (diffs arriving meanwhile wait for it).
    for (const view of this.presenceViews.values()) this.holdPresence(view);
    const resume = {
      rooms: [...since].map(([room, p]) => ({ room, epoch: p.epoch, seq: p.seq })),
      presenceEvents: [...this.presenceViews.keys()].filter((room) => since.has(room)),
    };
    let reply;
    try {
      reply = await this.request(
        { connect: { token: this.token, clientName: this.clientName, resume, deviceId: this.deviceId ?? '' } },
        this.requestTimeoutMs,
        requestId,
      );
    } catch (error) {
      // Refused or timed out: this connection is done; the connect loop decides what is next.
      if (this.resuming?.requestId === requestId) this.resuming.fail(/** @type {RoomwireError} */ (error));
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
    // The rooms' missed messages arrive now, each room's followed by its Joined (or an Error).
    try {
      this.resuming?.touch();
      await resumed;
    } catch (error) {
      // Lost while resuming (onClose left the retry to this loop), or no progress in time: a
      // new session resumes from the positions reached.
      if (this.conn === conn) {
        this.onClose(conn, null, 'rooms not resumed in time');
        conn.close();
      }
      throw error;
    }
    for (const [room, view] of [...this.presenceViews]) {
      if (this.rooms.has(room)) {
        view.retries = 0;
        this.refreshPresence(view);
      } else if (since.has(room)) {
        this.dropPresence(room); // not rejoined (onError said why)
      }
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
   * Takes the answer to a join with a position (`since`, null: none) into account: the room's
   * position, and a reset when the node could not replay everything missed.
   * @param {string} room
   * @param {any} joined the decoded Joined frame
   * @param {RoomPosition | null} since
   * @returns {Joined}
   */
  applyJoined(room, joined, since) {
    const position = { epoch: num(joined.epoch), seq: num(joined.seq) };
    /** @type {Joined['recovery']} */
    let recovery = null;
    if (since !== null) {
      const r = joined.recovery;
      if (r) {
        recovery = {
          recovered: r.recovered === true,
          replayed: num(r.replayed),
          oldest: positionOrNull(r.oldestEpoch, r.oldestSeq),
        };
      } else {
        // A node without history says nothing: recovered only when nothing was missed.
        const reached = this.rooms.get(room) ?? since;
        const missed = reached.epoch !== position.epoch || reached.seq < position.seq;
        recovery = { recovered: !missed, replayed: 0, oldest: null };
      }
      if (!recovery.recovered) {
        this.emitReset({ room, reason: 'not_kept', since, position, oldest: recovery.oldest });
      }
    }
    this.setPosition(room, position);
    return { room, ...position, recovery };
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
    // The user room, rejoined from where this device left it (offline delivery), is answered
    // like a resumed room; it is implicit, so there is nothing to track.
    if (frame.kind === 'joined' && frame.joined.room.startsWith('$user.')) return;
    if (id !== 0 && id === this.resuming?.requestId && (frame.kind === 'joined' || frame.kind === 'error')) {
      this.onResumed(frame);
      return;
    }
    switch (frame.kind) {
      case 'message': {
        const message = toMessage(frame.message);
        const room = message.room;
        const replayed = message.seq > 0 && this.catchingUp.has(room);
        if (message.seq > 0) {
          const last = this.rooms.get(room);
          if (last !== undefined) {
            // Already delivered (a replay overlapping what came live): never twice.
            if (message.epoch === last.epoch && message.seq <= last.seq) break;
            this.setPosition(room, { epoch: message.epoch, seq: message.seq });
          }
        }
        if (replayed) this.resuming?.touch();
        this.emit('message', message, { unreliable: message.seq === 0, datagram, transport: this.transport, replayed });
        if (this.deviceId && message.seq > 0 && room === `$user.${this.connected?.userId}`) {
          this.unreported = { room, epoch: message.epoch, seq: message.seq };
          this.seenTimer ??= setTimeout(() => this.flushSeen(), 1000);
        }
        break;
      }
      case 'epochChanged': {
        // The room's owner crashed and a new one restarted the room's sequence: whatever of the
        // old epoch after previousSeq this client did not get is not coming.
        const e = frame.epochChanged;
        const last = this.rooms.get(e.room);
        if (last) {
          const position = { epoch: num(e.epoch), seq: 0 };
          this.setPosition(e.room, position);
          this.emitReset({ room: e.room, reason: 'epoch_changed', since: last, position, oldest: null });
        }
        break;
      }
      case 'presenceDiff':
        this.onPresenceDiff(toPresenceDiff(frame.presenceDiff));
        break;
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
    this.resuming?.fail(lost);
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
   * @param {number} [requestId] default: the next one
   * @returns {Promise<any>} the decoded ServerFrame that answers it
   */
  request(kind, timeoutMs = this.requestTimeoutMs, requestId = this.nextRequest++) {
    const conn = this.conn;
    if (conn === null) {
      return Promise.reject(new RoomwireError('not connected', { reason: 'not_connected', retryable: true }));
    }
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
   * Joins a room. When this client, or an earlier page of this tab (sessionStorage), knows where
   * it left the room, the node first replays what was missed (onMessage, `info.replayed`), or
   * reports a reset (onReset) when it no longer keeps all of it; else messages follow from
   * `seq + 1`. Resumed on its own after a reconnect.
   *
   * With `presence: true` the client keeps the room's presence (onPresence, onPresenceJoin,
   * onPresenceLeave, presenceView()); `presenceInfo` is shown with this user in it. A join
   * without `presence` of a room whose presence is kept stops keeping it.
   * @param {string} room
   * @param {JoinOptions} [options]
   * @returns {Promise<Joined>}
   */
  async join(room, options = {}) {
    const { presence = false, presenceInfo } = options;
    const member = this.rooms.get(room);
    // Created before the Join goes out, so no diff that follows it is missed: they wait for
    // the list (fetched once joined).
    const kept = this.presenceViews.get(room);
    const view = presence ? (kept ?? this.newPresenceView(room)) : null;
    const since = member ?? this.lastPosition(room);
    if (since !== null) {
      // Replayed messages advance it, and a message already delivered is not delivered again.
      this.rooms.set(room, since);
      this.catchingUp.add(room);
    }
    let frame;
    try {
      frame = await this.request({
        join: {
          room,
          since: since === null ? undefined : { room, epoch: since.epoch, seq: since.seq },
          presenceEvents: presence,
          presenceInfo: presenceInfo === undefined ? undefined : toBytes(presenceInfo),
        },
      });
    } catch (error) {
      if (member === undefined) this.rooms.delete(room);
      if (view !== null && kept === undefined) this.dropPresence(room);
      throw error;
    } finally {
      this.catchingUp.delete(room);
    }
    const joined = this.applyJoined(room, frame.joined, since);
    if (view === null) this.dropPresence(room);
    else if (kept === undefined) this.refreshPresence(view);
    return joined;
  }

  /**
   * Leaves a room and forgets its position (a later join starts from the room's present).
   * @param {string} room
   */
  async leave(room) {
    this.dropPresence(room);
    this.rooms.delete(room);
    this.positions.delete(room);
    this.remember(room, null);
    await this.request({ leave: { room } });
  }

  /**
   * One page of a room's kept messages (any room the token may join; membership not needed):
   * `after` a position, oldest first (paging forward); `before` one, newest first (paging
   * back); neither, the newest, newest first. At most `limit` (default and most: the node's
   * page size, 128).
   * @param {string} room
   * @param {HistoryOptions} [options]
   * @returns {Promise<HistoryPage>}
   */
  async history(room, options = {}) {
    const { before, after, limit = 0 } = options;
    if (before && after) throw new TypeError('history: give before or after, not both');
    const at = (/** @type {RoomPosition | undefined} */ p) =>
      p ? { room, epoch: p.epoch, seq: p.seq } : undefined;
    const frame = await this.request({ history: { room, before: at(before), after: at(after), limit } });
    const page = frame.historyPage;
    return {
      room: page.room,
      messages: (page.messages ?? []).map(toMessage),
      more: page.more === true,
      position: { epoch: num(page.epoch), seq: num(page.seq) },
      oldest: positionOrNull(page.oldestEpoch, page.oldestSeq),
    };
  }

  /**
   * Who is in a room (a room whose class keeps presence, that the token may join; membership not
   * needed): every page of its member list, read one after the other. `version` is the first
   * page's: a later page may already include some diffs after it, and applying those diffs
   * again changes nothing. Refused with `ErrorCode.PRESENCE_OFF` (no presence in this room) or
   * `ErrorCode.PRESENCE_TOO_LARGE` (more users than the room lists: use presenceStats()).
   * @param {string} room
   * @returns {Promise<Presence>}
   */
  async presence(room) {
    for (let attempt = 1; ; attempt++) {
      /** @type {Map<string, PresenceMember>} */
      const members = new Map();
      /** @type {{ epoch: number, version: number, users: number, sessions: number } | null} */
      let first = null;
      let after = '';
      let moved = false;
      for (;;) {
        const frame = await this.request({ presence: { room, after, limit: this.presencePageSize } });
        const page = frame.presencePage;
        const epoch = num(page.epoch);
        if (first === null) {
          first = { epoch, version: num(page.version), users: page.users ?? 0, sessions: page.sessions ?? 0 };
        } else if (epoch !== first.epoch) {
          moved = true; // a new owner rebuilt the presence between two pages: read it again
          break;
        }
        for (const m of page.members ?? []) members.set(m.userId, toMember(m));
        const next = page.next ?? '';
        if (next === '' || next === after) break;
        after = next;
      }
      if (!moved && first !== null) {
        return { room, ...first, members: [...members.values()].sort(byUserId), truncated: false };
      }
      if (attempt >= PRESENCE_READ_ATTEMPTS) {
        throw new RoomwireError('the presence kept changing owner while it was read', {
          code: ErrorCode.UNAVAILABLE,
          reason: 'node',
          retryable: true,
        });
      }
    }
  }

  /**
   * How many are in a room (a room whose class keeps presence): users and sessions, at any size.
   * @param {string} room
   * @returns {Promise<PresenceStats>}
   */
  async presenceStats(room) {
    const frame = await this.request({ presenceStats: { room } });
    const stats = frame.presenceStats;
    return {
      room: stats.room,
      users: stats.users ?? 0,
      sessions: stats.sessions ?? 0,
      epoch: num(stats.epoch),
      version: num(stats.version),
    };
  }

  /**
   * The presence this client keeps of a room joined with `presence` (as of the last change),
   * or null: not such a room, or its list not fetched yet.
   * @param {string} room
   * @returns {Presence | null}
   */
  presenceView(room) {
    const view = this.presenceViews.get(room);
    return view?.loaded ? presenceOf(view) : null;
  }

  /**
   * @param {string} room
   * @returns {PresenceView}
   */
  newPresenceView(room) {
    /** @type {PresenceView} */
    const view = {
      room,
      loaded: false,
      epoch: 0,
      version: 0,
      users: 0,
      sessions: 0,
      truncated: false,
      members: new Map(),
      buffer: [],
      generation: 0,
      retries: 0,
      timer: undefined,
    };
    this.presenceViews.set(room, view);
    return view;
  }

  /**
   * Stops keeping a room's presence.
   * @param {string} room
   */
  dropPresence(room) {
    const view = this.presenceViews.get(room);
    if (view === undefined) return;
    this.holdPresence(view);
    this.presenceViews.delete(room);
  }

  /**
   * Cancels the view's fetch in flight or scheduled; diffs wait in its buffer until the next.
   * @param {PresenceView} view
   */
  holdPresence(view) {
    view.generation += 1;
    clearTimeout(view.timer);
    view.timer = undefined;
    view.buffer ??= [];
  }

  /**
   * (Re)fetches the view's list: at once the first time, then with a growing delay while
   * fetches keep failing or coming out stale (a room moving between owners).
   * @param {PresenceView} view
   */
  refreshPresence(view) {
    this.holdPresence(view);
    const generation = view.generation;
    const delay = view.retries === 0 ? 0 : Math.min(5000, 250 * 2 ** (view.retries - 1));
    view.retries += 1;
    view.timer = setTimeout(() => {
      view.timer = undefined;
      this.fetchPresence(view, generation).catch((error) => console.error(error));
    }, delay);
  }

  /**
   * @param {PresenceView} view
   * @param {number} generation
   */
  async fetchPresence(view, generation) {
    const current = () => this.presenceViews.get(view.room) === view && view.generation === generation;
    if (!current() || this.conn === null) return; // a reconnect fetches it again
    /** @type {Presence} */
    let presence;
    try {
      presence = await this.presence(view.room);
    } catch (error) {
      if (!current()) return;
      const e = /** @type {RoomwireError} */ (error);
      if (e.code === ErrorCode.PRESENCE_TOO_LARGE) {
        // Above the room's list cap: counts only, followed through the (truncated) diffs.
        try {
          const stats = await this.presenceStats(view.room);
          presence = { ...stats, members: [], truncated: true };
        } catch {
          if (current()) this.refreshPresence(view);
          return;
        }
        if (!current()) return;
      } else if (e.reason === 'node' && !e.retryable) {
        // PRESENCE_OFF (the room's class keeps none), FORBIDDEN: nothing to keep.
        this.dropPresence(view.room);
        this.emit('error', e);
        return;
      } else {
        if (e.reason !== 'not_connected' && e.reason !== 'connection_lost') this.refreshPresence(view);
        return; // lost with the connection: the reconnect fetches it again
      }
    }
    this.applyPresence(view, presence);
  }

  /**
   * Takes a fetched list, then the diffs that waited for it; tells what changed since the
   * previous list (none the first time).
   * @param {PresenceView} view
   * @param {Presence} presence
   */
  applyPresence(view, presence) {
    const shown = view.loaded ? this.shownMembers(view) : null;
    view.loaded = true;
    view.epoch = presence.epoch;
    view.version = presence.version;
    view.users = presence.users;
    view.sessions = presence.sessions;
    view.truncated = presence.truncated;
    view.members = new Map(presence.members.map((m) => [m.userId, m]));
    const buffered = view.buffer ?? [];
    view.buffer = null;
    let stale = false;
    for (const diff of buffered) {
      if (this.applyDiff(view, diff) === 'stale') {
        stale = true;
        break;
      }
    }
    this.emitPresence(view, shown);
    if (stale) this.refreshPresence(view);
    else view.retries = 0;
  }

  /** @param {PresenceDiff} diff */
  onPresenceDiff(diff) {
    const view = this.presenceViews.get(diff.room);
    if (view === undefined) return;
    if (view.buffer !== null) {
      view.buffer.push(diff);
      return;
    }
    const shown = this.shownMembers(view);
    const outcome = this.applyDiff(view, diff);
    if (outcome === 'applied') this.emitPresence(view, shown);
    else if (outcome === 'stale') this.refreshPresence(view);
  }

  /**
   * Applies the next diff of the view's stream. 'ignored': already in the list; 'stale': the
   * list must be fetched again (another epoch, a diff missed, a reset, or back under the list
   * cap after counts only).
   * @param {PresenceView} view
   * @param {PresenceDiff} diff
   * @returns {'applied' | 'ignored' | 'stale'}
   */
  applyDiff(view, diff) {
    if (diff.epoch !== view.epoch) return 'stale';
    if (diff.version <= view.version) return 'ignored';
    if (diff.reset || diff.version !== view.version + 1) return 'stale';
    if (view.truncated && !diff.truncated) return 'stale';
    view.version = diff.version;
    view.users = diff.users;
    view.sessions = diff.sessions;
    if (diff.truncated) {
      view.truncated = true;
      view.members.clear();
      return 'applied';
    }
    for (const m of diff.joined) view.members.set(m.userId, m);
    for (const id of diff.left) view.members.delete(id);
    return 'applied';
  }

  /**
   * The members a view shows now, to tell later who came and who left; null while it keeps
   * counts only.
   * @param {PresenceView} view
   * @returns {Map<string, PresenceMember> | null}
   */
  shownMembers(view) {
    return view.truncated ? null : new Map(view.members);
  }

  /**
   * Announces who came and who left since `shown` (null: nobody, e.g. the first list, or
   * counts only before or now), then the whole list.
   * @param {PresenceView} view
   * @param {Map<string, PresenceMember> | null} shown
   */
  emitPresence(view, shown) {
    const room = view.room;
    if (shown !== null && !view.truncated) {
      for (const [id, member] of view.members) {
        if (!shown.has(id)) this.emit('presencejoin', { room, member });
      }
      for (const [userId, member] of shown) {
        if (!view.members.has(userId)) this.emit('presenceleave', { room, userId, member });
      }
    }
    this.emit('presence', presenceOf(view));
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

  /**
   * Ends the session and stops reconnecting; pending requests fail with 'connection_lost'. The
   * rooms' positions stay stored, so a new client of this tab resumes them on join().
   */
  close() {
    this.closedByUser = true;
    clearInterval(this.heartbeat);
    this.savePositions();
    this.flushSeen();
    if (typeof globalThis.removeEventListener === 'function') {
      globalThis.removeEventListener('pagehide', this.onPageHide);
    }
    for (const view of this.presenceViews.values()) this.holdPresence(view);
    this.retryWait?.wake();
    if (this.conn) this.conn.close();
    else if (this.status !== 'closed') this.setStatus('closed');
  }
}
