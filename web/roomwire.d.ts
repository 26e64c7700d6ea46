// Type declarations of @roomwire/client, written by hand beside roomwire.js (why: the comment at
// the top of roomwire.js). tsc checks that roomwire.js is assignable to them and that consumer
// code compiles against them under --strict (tests/browser/package.mjs).

import type { ErrorCode as ErrorCodeValue } from './wire.js';
import type {
  Connected,
  ConnectionState,
  GapEvent,
  HistoryOptions,
  HistoryPage,
  Joined,
  JoinOptions,
  Message,
  MessageInfo,
  Presence,
  PresenceJoinEvent,
  PresenceLeaveEvent,
  PresenceStats,
  PublishAck,
  ResetEvent,
  RoomwireOptions,
  StatusEvent,
  TransportKind,
} from './types.js';

export { CloseCode, ErrorCode } from './wire.js';
export type {
  Connected,
  ConnectionState,
  GapEvent,
  HistoryOptions,
  HistoryPage,
  Joined,
  JoinOptions,
  Limits,
  Message,
  MessageInfo,
  Presence,
  PresenceJoinEvent,
  PresenceLeaveEvent,
  PresenceMember,
  PresenceStats,
  PublishAck,
  Recovery,
  ResetEvent,
  RoomPosition,
  RoomwireOptions,
  StatusEvent,
  StorageLike,
  TransportKind,
} from './types.js';

/** Why a request failed. */
export type FailureReason =
  /** The node answered with an Error frame: see `code`. */
  | 'node'
  /** There was no session when the request was made (before connect(), or while reconnecting). */
  | 'not_connected'
  /** The session ended before the answer came: the request may or may not have taken effect. */
  | 'connection_lost'
  /** No answer within `requestTimeoutMs`: the request may or may not have taken effect. */
  | 'timeout';

/**
 * A failed request. `retryable` is true when the same request may succeed later (the node's
 * UNAVAILABLE, and every reason but 'node'); retry a publish with the same clientMsgId, so a
 * publish that did take effect is acknowledged as a duplicate instead of delivered twice.
 */
export declare class RoomwireError extends Error {
  constructor(
    message: string,
    details: { code?: ErrorCodeValue; reason: FailureReason; retryable: boolean; room?: string },
  );
  /** The node's error code; `ErrorCode.UNSPECIFIED` (0) when the node did not answer. */
  readonly code: ErrorCodeValue;
  readonly reason: FailureReason;
  readonly retryable: boolean;
  /** The room it is about when one request covered several (a room a reconnect could not resume). */
  readonly room: string | null;
}

/**
 * A connection to a roomwire node: WebTransport first, WebSocket as the fallback, reconnecting
 * with backoff and jitter, and resuming its rooms where it left off after a reconnect (all in
 * the Connect) or a page reload (positions kept in sessionStorage, used by join()).
 */
export declare class RoomwireClient {
  constructor(options?: RoomwireOptions);

  /** The node's HTTP base URL. */
  readonly url: string;
  /** The token sent with the next connect (replace it after UNAUTHORIZED, then call connect()). */
  token: string;
  /** The transport of the current session, null while there is none. */
  readonly transport: TransportKind | null;
  readonly state: ConnectionState;
  /** The node's Connected answer for the current session, null while there is none. */
  readonly connected: Connected | null;
  /** Sessions opened so far (1 after the first connect; more after reconnects). */
  readonly sessions: number;
  /** The id sent as Connect.device_id (see RoomwireOptions.deviceId), null when none is sent. */
  readonly deviceId: string | null;

  /**
   * Connects, retrying with backoff until it works or close() is called (one loop at a time;
   * resolves at once when connected). Rejects only on close() or a refused token
   * (`ErrorCode.UNAUTHORIZED`).
   */
  connect(): Promise<Connected>;
  /** Ends the session and stops reconnecting; pending requests fail with 'connection_lost'. */
  close(): void;

  /**
   * Joins a room; resumed on its own after a reconnect. When this client or an earlier page of
   * the tab knows where it left the room, the missed messages are replayed first (onMessage with
   * `info.replayed`) or a reset is reported (onReset); `recovery` tells which.
   *
   * `presence: true` keeps the room's presence: its member list is fetched, kept current from
   * the node's diffs (fetched again when one is missed, the room changes owner, or after a
   * reconnect), and reported through onPresence, onPresenceJoin, onPresenceLeave and
   * presenceView(). `presenceInfo` is shown with this user in the room's presence.
   */
  join(room: string, options?: JoinOptions): Promise<Joined>;
  /** Leaves a room, forgets its position and stops keeping its presence. */
  leave(room: string): Promise<void>;
  /**
   * A page of a room's kept messages (a room the token may join; membership not needed):
   * `after` a position oldest first, `before` one newest first, neither the newest.
   */
  history(room: string, options?: HistoryOptions): Promise<HistoryPage>;
  /**
   * Who is in a room (a room whose class keeps presence and that the token may join; membership
   * not needed): every page of its member list. Refused with `ErrorCode.PRESENCE_OFF` (the room
   * keeps no presence) or `ErrorCode.PRESENCE_TOO_LARGE` (more users than it lists: use
   * presenceStats()).
   */
  presence(room: string): Promise<Presence>;
  /** How many users and sessions are in a room (a room whose class keeps presence). */
  presenceStats(room: string): Promise<PresenceStats>;
  /**
   * The presence kept of a room joined with `presence`, as of its last change; null for other
   * rooms, and until its list is first fetched (onPresence tells when).
   */
  presenceView(room: string): Presence | null;
  /**
   * Reliable, sequenced publish, resolved with the owner's acknowledgement (`duplicate` when the
   * clientMsgId had been sequenced before). `clientMsgId` defaults to a fresh newMessageId().
   */
  publish(room: string, payload: string | Uint8Array | ArrayBuffer, clientMsgId?: string): Promise<PublishAck>;
  /** Unreliable publish (a QUIC datagram over WebTransport); dropped when not connected. */
  publishUnreliable(room: string, payload: string | Uint8Array | ArrayBuffer): Promise<void>;
  /**
   * A fresh clientMsgId: a random prefix per client instance (so tabs and reloads of one user
   * never collide in the node's de-duplication window) and a counter. Take one before the first
   * attempt of a publish and reuse it for every retry.
   */
  newMessageId(): string;

  /** Every Message of the joined rooms. Each on* method returns a function removing the listener. */
  onMessage(cb: (message: Message, info: MessageInfo) => void): () => void;
  /** connecting / connected / reconnecting (with `delay` and `retryAt`) / closed. */
  onStatus(cb: (event: StatusEvent) => void): () => void;
  /**
   * A joined room goes on without some messages this client missed: older than what the room
   * keeps, or lost with a crashed owner (a new epoch). Refetch from `oldest` (history()) or from
   * the application's own store.
   */
  onReset(cb: (reset: ResetEvent) => void): () => void;
  /** @deprecated Use onReset; fired on every reset, with the seqs as numbers. */
  onGap(cb: (gap: GapEvent) => void): () => void;
  /**
   * Errors that answer no request, rooms a reconnect could not resume (`error.room`; join
   * again to retry, from the kept position), and the presence of a room joined with `presence`
   * that cannot be kept (`ErrorCode.PRESENCE_OFF`: the room keeps none).
   */
  onError(cb: (error: RoomwireError) => void): () => void;
  /**
   * The whole presence of a room joined with `presence` (members and counts), once its list is
   * fetched and after every change. With `truncated` the room is above its list cap: counts only.
   */
  onPresence(cb: (presence: Presence) => void): () => void;
  /**
   * A user came into a room joined with `presence`. The users already there when the list is
   * first fetched are not announced; after a reconnect, the ones who came meanwhile are.
   */
  onPresenceJoin(cb: (event: PresenceJoinEvent) => void): () => void;
  /**
   * A user left a room joined with `presence`: its last session ended and the node's grace
   * period passed (a quick reload or reconnect is not a leave).
   */
  onPresenceLeave(cb: (event: PresenceLeaveEvent) => void): () => void;
}
