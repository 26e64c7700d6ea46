// An application's use of @roomwire/client, compiled with `tsc --strict` against the packed
// package's declarations. The @ts-expect-error lines prove the types are not `any`.
import {
  CloseCode,
  ErrorCode,
  RoomwireClient,
  RoomwireError,
  type ConnectionState,
  type GapEvent,
  type HistoryPage,
  type Message,
  type MessageInfo,
  type Presence,
  type PresenceMember,
  type PresenceStats,
  type PublishAck,
  type ResetEvent,
  type RoomPosition,
  type StatusEvent,
  type StorageLike,
} from '@roomwire/client';

const client = new RoomwireClient({
  url: 'https://rooms.example.com',
  token: 'alice',
  transport: 'auto',
  initialBackoffMs: 500,
  storage: null,
  deviceId: 'laptop-1',
});

// Positions kept in a storage of the application's own (e.g. in Node), and no device id.
const memory = new Map<string, string>();
const store: StorageLike = {
  getItem: (key) => memory.get(key) ?? null,
  setItem: (key, value) => void memory.set(key, value),
  removeItem: (key) => void memory.delete(key),
};
export const nodeClient = new RoomwireClient({ url: 'http://127.0.0.1:8080', storage: store, deviceId: null });
const device: string | null = nodeClient.deviceId;
console.log(device);

const stop = client.onMessage((message: Message, info: MessageInfo) => {
  const text: string = message.text();
  const position: [number, number] = [message.epoch, message.seq];
  const bytes: Uint8Array = message.payload;
  if (info.datagram || info.unreliable) console.log(text, position, bytes.length);
  if (info.replayed) console.log("missed while away", position);
});
stop();
client.onStatus((event: StatusEvent) => {
  const state: ConnectionState = event.state;
  if (state === 'reconnecting' && event.retryAt !== undefined) {
    console.log(`retrying in ${event.retryAt - Date.now()} ms`);
  }
  if (event.transport === 'webtransport') console.log('on QUIC');
});
client.onReset((reset: ResetEvent) => {
  const from: RoomPosition | null = reset.oldest;
  if (reset.reason === 'not_kept' && from !== null) console.log(reset.room, reset.since.seq, from.seq);
  if (reset.reason === 'epoch_changed') console.log('renumbered from', reset.position.epoch);
});
client.onGap((gap: GapEvent) => {
  const missed: number | null = gap.toSeq === null ? null : gap.toSeq - gap.fromSeq + 1;
  console.log(gap.room, missed, gap.epochChanged);
});
client.onError((error: RoomwireError) => {
  const code: ErrorCode = error.code;
  const room: string | null = error.room;
  if (room !== null) console.log('not resumed', room);
  console.log(code === ErrorCode.RATE_LIMITED);
});

export async function chat(): Promise<void> {
  const connected = await client.connect();
  const user: string = connected.userId;
  const maxFrame: number = connected.limits.maxFrameBytes;
  const joined = await client.join('lobby');
  console.log(user, maxFrame, joined.seq, client.state, client.transport);
  if (joined.recovery !== null && !joined.recovery.recovered) console.log('reset at', joined.recovery.oldest);
  let page: HistoryPage = await client.history('lobby', { limit: 50 });
  while (page.more) {
    const oldest = page.messages[page.messages.length - 1];
    page = await client.history('lobby', { before: oldest, limit: 50 });
  }
  const forward = await client.history('lobby', { after: { epoch: joined.epoch, seq: 0 } });
  const texts: string[] = forward.messages.map((m) => m.text());
  console.log(texts, page.position.seq, page.oldest?.seq);
  // @ts-expect-error a position is { epoch, seq }
  await client.history('lobby', { before: 5 });
  const id = client.newMessageId();
  let ack: PublishAck;
  try {
    ack = await client.publish('lobby', 'hello', id);
  } catch (error) {
    if (!(error instanceof RoomwireError) || !error.retryable) throw error;
    if (error.reason === 'not_connected' || error.reason === 'timeout') await client.connect();
    ack = await client.publish('lobby', 'hello', id);
  }
  if (ack.duplicate) console.log('sent before, as', ack.epoch, ack.seq);
  await client.publish('lobby', new Uint8Array([1, 2, 3]));
  await client.publishUnreliable('lobby', 'typing');
  // Presence: who is in the room, kept current.
  await client.join('lobby', { presence: true, presenceInfo: 'Alice' });
  await client.join('bytes', { presenceInfo: new Uint8Array([1]) });
  client.onPresence((presence: Presence) => {
    const names: string[] = presence.members.map((m: PresenceMember) => m.infoText || m.userId);
    if (presence.truncated) console.log(presence.users, 'online');
    else console.log(names, presence.epoch, presence.version, presence.sessions);
  });
  client.onPresenceJoin(({ room, member }) => console.log(room, member.userId, member.sessions, member.info.length));
  client.onPresenceLeave(({ room, userId, member }) => console.log(room, userId, member.infoText));
  const everyone: Presence = await client.presence('lobby');
  const stats: PresenceStats = await client.presenceStats('lobby');
  const view: Presence | null = client.presenceView('lobby');
  console.log(everyone.members.length, stats.users, view?.users);
  // @ts-expect-error presence is a boolean
  await client.join('lobby', { presence: 'yes' });
  await client.leave('lobby');
  client.close();
  console.log(CloseCode.SLOW_CONSUMER === 4001);
}

// @ts-expect-error transport is 'auto', 'webtransport' or 'websocket'
new RoomwireClient({ transport: 'carrier-pigeon' });
// @ts-expect-error publish needs a payload
void client.publish('lobby');
// @ts-expect-error the state is read-only
client.state = 'connected';
export function wrongTypes(message: Message, ack: PublishAck): void {
  // @ts-expect-error seq is a number
  const seq: string = message.seq;
  // @ts-expect-error duplicate is a boolean
  const duplicate: string = ack.duplicate;
  // @ts-expect-error error codes are literal numbers from the .proto
  const code: typeof ErrorCode.FORBIDDEN = 11;
  console.log(seq, duplicate, code);
}
