// roomwire browser client: WebTransport first (trusting the node's generated certificate through
// serverCertificateHashes), WebSocket as the fallback, reconnect with exponential backoff and
// jitter, application heartbeats (Ping frames), and rooms rejoined after a reconnect.
//
// Frames are Protobuf, encoded by protobuf.js from the node's own proto/roomwire/v1/roomwire.proto
// (served at /client/roomwire.proto), so browser and node share one contract.
//
//   import { RoomwireClient } from '/client/roomwire.js';
//   const client = new RoomwireClient({ token: 'alice' });
//   client.onMessage((m, info) => console.log(m.room, m.seq, m.payload, info.unreliable));
//   await client.connect();
//   await client.join('lobby');
//   await client.publish('lobby', 'hello');
//   client.publishUnreliable('lobby', 'typing');

import './vendor/protobuf.min.js';

const protobuf = globalThis.protobuf;
const encoder = new TextEncoder();

let typesPromise = null;

/** Loads the wire types from the node's .proto file (once per page). */
function loadTypes(base) {
  typesPromise ??= fetch(new URL('/client/roomwire.proto', base))
    .then((response) => {
      if (!response.ok) throw new Error(`roomwire.proto: HTTP ${response.status}`);
      return response.text();
    })
    .then((text) => {
      const root = protobuf.parse(text).root;
      return {
        ClientFrame: root.lookupType('roomwire.v1.ClientFrame'),
        ServerFrame: root.lookupType('roomwire.v1.ServerFrame'),
      };
    });
  return typesPromise;
}

function toBytes(payload) {
  if (payload instanceof Uint8Array) return payload;
  if (payload instanceof ArrayBuffer) return new Uint8Array(payload);
  return encoder.encode(String(payload));
}

function base64ToBytes(b64) {
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

/** Protobuf varint length prefix + frame: the WebTransport stream framing. */
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
  constructor(maxFrame) {
    this.buf = new Uint8Array(0);
    this.maxFrame = maxFrame;
  }

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

/** ErrorCode.ERROR_CODE_UNAUTHORIZED in roomwire.proto: a refused token, not worth retrying. */
const ERROR_CODE_UNAUTHORIZED = 9;

/** WebTransport: one bidirectional stream for the session, datagrams beside it. */
class WebTransportConnection {
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

  constructor(wt, stream, onFrame, onClose) {
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
      const info = await Promise.race([
        this.wt.closed,
        new Promise((resolve) => setTimeout(() => resolve({}), 3000)),
      ]);
      code = info.closeCode ?? null;
      reason = info.reason ?? reason;
    } catch (error) {
      reason = String(error?.message ?? error);
      // A broken stream must not leave the session open on the node (it would stay a member).
      try {
        this.wt.close({ closeCode: 1000, reason: 'stream error' });
      } catch {}
    }
    await datagrams;
    this.onClose(code, reason);
  }

  send(frame) {
    return this.writer.write(delimit(frame));
  }

  /** A datagram when it fits the path, else the stream (unreliable frames may take either). */
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

  constructor(ws) {
    this.kind = 'websocket';
    this.ws = ws;
  }

  send(frame) {
    this.ws.send(frame);
    return Promise.resolve();
  }

  sendUnreliable(frame) {
    return this.send(frame);
  }

  close() {
    this.ws.close(1000, 'bye');
  }
}

export class RoomwireClient {
  /**
   * @param {object} options
   * @param {string} [options.url] the node's HTTP base URL (default: this page's origin)
   * @param {string} [options.token] connection token (development mode: the user id)
   * @param {string} [options.clientName]
   * @param {'auto'|'webtransport'|'websocket'} [options.transport] 'auto': WebTransport, then WebSocket
   * @param {number} [options.heartbeatMs] application Ping interval (default: the node's)
   * @param {number} [options.initialBackoffMs] first reconnect delay
   * @param {number} [options.maxBackoffMs] longest reconnect delay
   */
  constructor(options = {}) {
    this.base = options.url ?? globalThis.location?.origin;
    this.token = options.token ?? '';
    this.clientName = options.clientName ?? 'roomwire-web/0.1';
    this.preferred = options.transport ?? 'auto';
    this.heartbeatMs = options.heartbeatMs ?? null;
    this.initialBackoffMs = options.initialBackoffMs ?? 250;
    this.maxBackoffMs = options.maxBackoffMs ?? 30000;
    this.conn = null;
    this.connected = null;
    this.rooms = new Map(); // room -> { epoch, seq } last seen
    this.pending = new Map(); // request id -> { resolve, reject }
    this.nextRequest = 1;
    this.listeners = { message: [], status: [], error: [], gap: [] };
    this.connecting = null; // the one connect loop in flight, if any
    this.upSince = 0;
    this.attempt = 0;
    this.closedByUser = false;
    this.heartbeat = null;
    /** Sessions opened so far (1 after the first connect; more after reconnects). */
    this.sessions = 0;
  }

  /** Which transport the session runs on right now ('webtransport', 'websocket' or null). */
  get transport() {
    return this.conn?.kind ?? null;
  }

  /** cb(message, { unreliable, transport }) for every Message frame. */
  onMessage(cb) {
    this.listeners.message.push(cb);
  }

  /** cb({ state, transport, detail }) on connecting / connected / reconnecting / closed. */
  onStatus(cb) {
    this.listeners.status.push(cb);
  }

  /**
   * cb({ room, fromSeq, toSeq, epochChanged }) when messages of a joined room were skipped: on a
   * reconnect, or when the room's owner in a mesh crashed and the room restarted in a new epoch
   * (`toSeq` null: an unknown number). The node does not replay them yet (history is a later
   * feature), so the application can refetch.
   */
  onGap(cb) {
    this.listeners.gap.push(cb);
  }

  /** cb(error) for Error frames that answer no request. */
  onError(cb) {
    this.listeners.error.push(cb);
  }

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
   * Connects, retrying with backoff until it works or close() is called. There is only ever one
   * such loop: a second call returns the first one's promise. A refused token (UNAUTHORIZED) is
   * final: set a new `client.token` and call connect() again.
   */
  connect() {
    this.closedByUser = false;
    this.connecting ??= this.connectLoop().finally(() => {
      this.connecting = null;
    });
    return this.connecting;
  }

  async connectLoop() {
    this.types ??= await loadTypes(this.base);
    for (;;) {
      try {
        await this.open();
        return this.connected;
      } catch (error) {
        if (this.closedByUser) throw error;
        if (error?.code === ERROR_CODE_UNAUTHORIZED) {
          this.emit('status', { state: 'closed', transport: null, detail: 'unauthorized: a new token is needed' });
          throw error;
        }
        const delay = this.backoff();
        this.emit('status', { state: 'reconnecting', transport: null, detail: String(error), delay });
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
  }

  /** Exponential backoff with full jitter: uniform in [d/2, d], d doubling up to the maximum. */
  backoff() {
    const ceiling = Math.min(this.maxBackoffMs, this.initialBackoffMs * 2 ** this.attempt);
    this.attempt += 1;
    return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
  }

  async open() {
    this.emit('status', { state: 'connecting', transport: null });
    const onFrame = (bytes, datagram) => this.onFrame(bytes, datagram);
    let conn = null;
    // Bound to this connection: a late close of an older one must not tear down the current one.
    const onClose = (code, reason) => this.onClose(conn, code, reason);
    const tryWebTransport =
      this.preferred !== 'websocket' && typeof globalThis.WebTransport === 'function';
    if (tryWebTransport) {
      try {
        conn = await WebTransportConnection.open(this.base, this.token, onFrame, onClose);
      } catch (error) {
        if (this.preferred === 'webtransport') throw error;
        console.warn('roomwire: WebTransport failed, falling back to WebSocket:', error);
      }
    }
    conn ??= await WebSocketConnection.open(this.base, onFrame, onClose);
    this.conn = conn;
    const resume = {
      rooms: [...this.rooms].map(([room, pos]) => ({ room, epoch: pos.epoch, seq: pos.seq })),
    };
    let connected;
    try {
      connected = await this.request({
        connect: { token: this.token, clientName: this.clientName, resume },
      });
    } catch (error) {
      // Refused or timed out: this connection is done; the connect loop decides what is next.
      this.conn = null;
      conn.close();
      throw error;
    }
    this.connected = connected.connected;
    this.sessions += 1;
    // The backoff resets only once a session has stayed up a while (see onClose).
    this.upSince = Date.now();
    this.startHeartbeat();
    // Rejoin what was joined before a reconnect, and say what was missed in between.
    for (const [room, last] of this.rooms) {
      try {
        const reply = await this.request({ join: { room } });
        const joined = reply.joined;
        const epoch = Number(joined.epoch);
        const seq = Number(joined.seq);
        if (last.seq > 0 && (epoch !== last.epoch || seq > last.seq)) {
          this.emit('gap', { room, fromSeq: last.seq + 1, toSeq: seq, epochChanged: epoch !== last.epoch });
        }
        this.rooms.set(room, { epoch, seq });
      } catch (error) {
        this.emit('error', error);
      }
    }
    this.emit('status', { state: 'connected', transport: conn.kind, detail: this.connected });
  }

  startHeartbeat() {
    clearInterval(this.heartbeat);
    const every = this.heartbeatMs ?? Math.max(1000, (this.connected?.heartbeatIntervalMs || 25000) / 2);
    this.heartbeat = setInterval(() => {
      // A Ping unanswered within two intervals means the path is dead: reconnect.
      this.request({ ping: { nonce: Date.now() } }, every * 2).catch(() => this.conn?.close());
    }, every);
  }

  onFrame(bytes, datagram) {
    let frame;
    try {
      frame = this.types.ServerFrame.decode(bytes);
    } catch (error) {
      console.warn('roomwire: undecodable frame', error);
      return;
    }
    const id = Number(frame.requestId ?? 0);
    if (id !== 0 && this.pending.has(id)) {
      const { resolve, reject } = this.pending.get(id);
      this.pending.delete(id);
      if (frame.kind === 'error') reject(Object.assign(new Error(frame.error.message), frame.error));
      else resolve(frame);
      return;
    }
    switch (frame.kind) {
      case 'message': {
        const m = frame.message;
        const message = {
          room: m.room,
          epoch: Number(m.epoch),
          seq: Number(m.seq),
          publisher: m.publisher,
          payload: m.payload,
          clientMsgId: m.clientMsgId,
          text: () => new TextDecoder().decode(m.payload),
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
            fromSeq: Math.min(last.seq, Number(e.previousSeq)) + 1,
            toSeq: null,
            epochChanged: true,
          });
          this.rooms.set(e.room, { epoch: Number(e.epoch), seq: 0 });
        }
        break;
      }
      case 'goAway':
        // The node drains: reconnect (elsewhere) after the delay it asks for.
        this.reconnectAfter = frame.goAway.reconnectAfterMs;
        break;
      case 'error':
        this.emit('error', frame.error);
        break;
      default:
        break;
    }
  }

  onClose(conn, code, reason) {
    if (conn === null || conn !== this.conn) return; // an older or never-established connection
    clearInterval(this.heartbeat);
    this.conn = null;
    if (Date.now() - this.upSince > 10000) this.attempt = 0;
    for (const { reject } of this.pending.values()) reject(new Error(`closed (${code}): ${reason}`));
    this.pending.clear();
    if (this.closedByUser) {
      this.emit('status', { state: 'closed', transport: null, detail: { code, reason } });
      return;
    }
    const delay = Math.max(this.reconnectAfter ?? 0, this.backoff());
    this.reconnectAfter = null;
    this.emit('status', { state: 'reconnecting', transport: null, detail: { code, reason }, delay });
    // connect() joins the one loop in flight rather than starting another.
    setTimeout(() => this.connect().catch(() => {}), delay);
  }

  encode(fields) {
    return this.types.ClientFrame.encode(this.types.ClientFrame.fromObject(fields)).finish();
  }

  request(kind, timeoutMs = 10000) {
    if (!this.conn) return Promise.reject(new Error('not connected'));
    const requestId = this.nextRequest++;
    const bytes = this.encode({ requestId, ...kind });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(requestId);
        reject(new Error('request timed out'));
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
      this.conn.send(bytes).catch((error) => {
        this.pending.delete(requestId);
        clearTimeout(timer);
        reject(error);
      });
    });
  }

  async join(room) {
    const frame = await this.request({ join: { room } });
    const joined = frame.joined;
    this.rooms.set(room, { epoch: Number(joined.epoch), seq: Number(joined.seq) });
    return joined;
  }

  async leave(room) {
    this.rooms.delete(room);
    await this.request({ leave: { room } });
  }

  /** Reliable, sequenced publish; resolves with the owner's acknowledgement { epoch, seq }. */
  async publish(room, payload, clientMsgId = crypto.randomUUID()) {
    const frame = await this.request({
      publish: { room, payload: toBytes(payload), clientMsgId, unreliable: false },
    });
    return frame.publishAck;
  }

  /** Unreliable publish (a datagram over WebTransport): no sequence, no acknowledgement. */
  publishUnreliable(room, payload) {
    if (!this.conn) return Promise.resolve();
    const bytes = this.encode({ publish: { room, payload: toBytes(payload), unreliable: true } });
    return this.conn.sendUnreliable(bytes).catch(() => {});
  }

  close() {
    this.closedByUser = true;
    clearInterval(this.heartbeat);
    this.conn?.close();
  }
}
