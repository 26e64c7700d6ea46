// The data the client hands to and gets from applications, shared by roomwire.d.ts (the public
// declarations) and roomwire.js (whose JSDoc refers to them, so tsc checks the implementation
// against the same shapes).

/** The transport a session runs on. */
export type TransportKind = 'webtransport' | 'websocket';

/** 'idle' before the first connect(), 'closed' after close(). */
export type ConnectionState = 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'closed';

export interface RoomwireOptions {
  /** The node's HTTP base URL, e.g. `https://rooms.example.com`. Default: the page's origin. */
  url?: string;
  /** Connection token: a JWT, or in the node's development mode the user id. */
  token?: string;
  /** Free-form name and version for the node's logs. Default `roomwire-web/0.1`. */
  clientName?: string;
  /** `'auto'` (default): WebTransport when the browser has it, else (or when it fails) WebSocket. */
  transport?: 'auto' | TransportKind;
  /** Application Ping interval in ms. Default: half the node's heartbeat interval. */
  heartbeatMs?: number;
  /** First reconnect delay in ms (default 250); doubles per failed attempt, with jitter. */
  initialBackoffMs?: number;
  /** Longest reconnect delay in ms (default 30 000). */
  maxBackoffMs?: number;
  /** How long a request (join, publish, …) waits for the node's answer, in ms (default 10 000). */
  requestTimeoutMs?: number;
}

/** The node's answer to Connect: the session and the limits it runs under. */
export interface Connected {
  sessionId: string;
  nodeId: string;
  region: string;
  /** The identity the node authenticated; messages to this user arrive on room `$user.<userId>`. */
  userId: string;
  heartbeatIntervalMs: number;
  idleTimeoutMs: number;
  /** Unix ms; 0 when the token does not expire. */
  tokenExpiresAtMs: number;
  limits: Limits;
}

export interface Limits {
  maxFrameBytes: number;
  maxRooms: number;
  maxRoomNameBytes: number;
  sendQueueFrames: number;
  sendQueueBytes: number;
  maxViolations: number;
  framesPerSecond: number;
  bytesPerSecond: number;
}

/** Where a join entered the room: its messages follow from `seq + 1`. */
export interface Joined {
  room: string;
  epoch: number;
  /** The last sequence number the room had assigned when this session joined (0: none yet). */
  seq: number;
}

/** The room owner's acknowledgement of a reliable publish. */
export interface PublishAck {
  room: string;
  clientMsgId: string;
  epoch: number;
  seq: number;
  /**
   * True when the node had already sequenced a publish with this clientMsgId from this user
   * (within its de-duplication window, 120 s by default): a retry. Nothing was delivered again;
   * epoch and seq are the original's.
   */
  duplicate: boolean;
}

/** A message delivered to a room this client has joined. */
export interface Message {
  room: string;
  /** `(epoch, seq)` orders a room's messages; both 0 for unreliable messages. */
  epoch: number;
  seq: number;
  /** User id of the publisher (`$server` for the node's HTTP API). */
  publisher: string;
  payload: Uint8Array;
  clientMsgId: string;
  /** Node clock when the owner sequenced it, Unix ms (0 for unreliable messages). */
  serverTimeMs: number;
  /** The payload decoded as UTF-8. */
  text(): string;
}

export interface MessageInfo {
  /** Sent with publishUnreliable: no sequence, may be lost. */
  unreliable: boolean;
  /** Arrived as a QUIC datagram (WebTransport only). */
  datagram: boolean;
  transport: TransportKind | null;
}

export interface StatusEvent {
  state: ConnectionState;
  transport: TransportKind | null;
  /** `Connected` when connected; the close code and reason, or the error, otherwise. */
  detail?: unknown;
  /** When reconnecting: ms until the next attempt. */
  delay?: number;
  /** When reconnecting: the next attempt's time (`Date.now()` clock), for a countdown. */
  retryAt?: number;
}

/** Messages of a joined room this client missed (on a reconnect, or when a room restarted). */
export interface GapEvent {
  room: string;
  fromSeq: number;
  /** null: an unknown number (the room restarted in a new epoch). */
  toSeq: number | null;
  epochChanged: boolean;
}
