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
  /**
   * How long a request (join, publish, …) waits for the node's answer, in ms (default 10 000);
   * also how long a reconnect's resume may go without progress.
   */
  requestTimeoutMs?: number;
  /**
   * Where each joined room's position is kept across page reloads, so `join()` on the next page
   * resumes where this one left off. Default: `sessionStorage` when there is one (one entry per
   * node origin and user: the token's JWT `sub`, or the token itself in development mode);
   * `null`: positions live only as long as the client.
   */
  storage?: StorageLike | null;
  /**
   * This device's stable id, sent as `Connect.device_id` (1–64 characters of `[A-Za-z0-9._-]`):
   * the node delivers what was sent to the user room `$user.<id>` while this device was away.
   * Default: a random id generated once and kept in `localStorage` (`roomwire.deviceId`; none
   * where there is no localStorage, e.g. in Node: pass one); `null`: send none.
   */
  deviceId?: string | null;
}

/** The part of the Web Storage interface the client uses (sessionStorage fits). */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** A point in a room's message stream: the message `(epoch, seq)`, or just before the next one. */
export interface RoomPosition {
  epoch: number;
  seq: number;
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

/** Where a join entered the room: its live messages follow from `seq + 1`. */
export interface Joined {
  room: string;
  epoch: number;
  /** The last sequence number the room had assigned when this session joined (0: none yet). */
  seq: number;
  /** When the join resumed from a known position: what became of it. null: a fresh join. */
  recovery: Recovery | null;
}

/** The node's account of a resume from a known position. */
export interface Recovery {
  /**
   * true: every message missed was replayed (before the join resolved). false: a reset, some
   * were not kept any more; an onReset event was fired.
   */
  recovered: boolean;
  /** Messages replayed. */
  replayed: number;
  /** The oldest position the room keeps (null: nothing kept, or not known). */
  oldest: RoomPosition | null;
}

/**
 * A joined room continues without some of the messages this client had not received: read what
 * the room still keeps with `history()` from `oldest`, or refetch from the application's store.
 * The client's position moves to `position`; nothing is renumbered silently.
 */
export interface ResetEvent {
  room: string;
  /**
   * `'not_kept'`: the position is older than what the room keeps (retention), or of an epoch it
   * cannot bridge. `'epoch_changed'`: in a mesh, the room's owner stopped without handing it
   * over and the room restarted at seq 1 of a new epoch; the old epoch's messages after `since`
   * that this node never received are not coming.
   */
  reason: 'not_kept' | 'epoch_changed';
  /** The last position this client had. */
  since: RoomPosition;
  /** Where the room continues: its messages from here on arrive live. */
  position: RoomPosition;
  /** The oldest position the room keeps (null: nothing kept, or not known). */
  oldest: RoomPosition | null;
}

/** Which page of a room's history to read. Neither before nor after: the newest messages. */
export interface HistoryOptions {
  /** Messages before this position (a message's `{ epoch, seq }`), newest first. */
  before?: RoomPosition;
  /** Messages after this position, oldest first. */
  after?: RoomPosition;
  /** At most this many; the node never sends more than its page size (128), the default. */
  limit?: number;
}

/** One page of a room's history. */
export interface HistoryPage {
  room: string;
  /** In the order asked for: oldest first with `after`, newest first otherwise. */
  messages: Message[];
  /** More messages lie beyond the last one, in the same direction. */
  more: boolean;
  /** The room's current position. */
  position: RoomPosition;
  /** The oldest position the room keeps (null: nothing kept). */
  oldest: RoomPosition | null;
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
  /** Missed while away, replayed by the node on a join or a reconnect's resume. */
  replayed: boolean;
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

/**
 * Deprecated: use `ResetEvent` (onReset). Fired with every reset: `fromSeq` is the first seq not
 * received, `toSeq` the last one missed when the epoch did not change (else null).
 */
export interface GapEvent {
  room: string;
  fromSeq: number;
  /** null: an unknown number (the room restarted in a new epoch). */
  toSeq: number | null;
  epochChanged: boolean;
}

/** What join() does besides joining. */
export interface JoinOptions {
  /**
   * Keep this room's presence (who is in it): the client fetches the member list and follows the
   * node's presence diffs, firing onPresence / onPresenceJoin / onPresenceLeave and keeping
   * presenceView(room) current, across reconnects. Only rooms whose class keeps presence have one
   * (else onError gets `ErrorCode.PRESENCE_OFF` and the room is joined without it). Default false.
   */
  presence?: boolean;
  /**
   * Shown with this user in the room's presence (a display name, an avatar URL): a string
   * (sent as UTF-8) or bytes, at most the node's `rooms.presence_info_max_bytes` (256 by
   * default). The user's last joining session sets it; a join without it keeps the one shown.
   */
  presenceInfo?: string | Uint8Array;
}

/** A user in a room's presence: its sessions (on any node) merged into one entry. */
export interface PresenceMember {
  userId: string;
  /** The user's sessions in the room; 0 while a leave waits out the node's grace period. */
  sessions: number;
  /** The presence info of the user's last joining session (empty: none). */
  info: Uint8Array;
  /** `info` decoded as UTF-8 (e.g. a display name). */
  infoText: string;
}

/**
 * A room's presence: what presence(room) reads, and the view onPresence reports. `(epoch,
 * version)` says where it stands in the node's stream of presence diffs.
 */
export interface Presence {
  room: string;
  /** Names the room owner's presence state (a new owner rebuilds it under a new epoch). */
  epoch: number;
  /** The last of the room's presence diffs this list includes. */
  version: number;
  /** Users and sessions in the room. */
  users: number;
  sessions: number;
  /** By user id. Empty when `truncated`. */
  members: PresenceMember[];
  /**
   * The room has more users than its class lists: only the counts are kept (presence() refuses
   * such a room with `ErrorCode.PRESENCE_TOO_LARGE`; presenceStats() still answers).
   */
  truncated: boolean;
}

/** How many are in a room (cheap at any size). */
export interface PresenceStats {
  room: string;
  users: number;
  sessions: number;
  epoch: number;
  version: number;
}

/**
 * A user came into a room whose presence this client keeps (after the first list: the users
 * already there when it was fetched are not announced).
 */
export interface PresenceJoinEvent {
  room: string;
  member: PresenceMember;
}

/** A user left a room whose presence this client keeps (its grace period over). */
export interface PresenceLeaveEvent {
  room: string;
  userId: string;
  /** The user's entry as it was last shown. */
  member: PresenceMember;
}
