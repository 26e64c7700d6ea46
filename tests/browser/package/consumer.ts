// An application's use of @roomwire/client, compiled with `tsc --strict` against the packed
// package's declarations. The @ts-expect-error lines prove the types are not `any`.
import {
  CloseCode,
  ErrorCode,
  RoomwireClient,
  RoomwireError,
  type ConnectionState,
  type GapEvent,
  type Message,
  type MessageInfo,
  type PublishAck,
  type StatusEvent,
} from '@roomwire/client';

const client = new RoomwireClient({
  url: 'https://rooms.example.com',
  token: 'alice',
  transport: 'auto',
  initialBackoffMs: 500,
});

const stop = client.onMessage((message: Message, info: MessageInfo) => {
  const text: string = message.text();
  const position: [number, number] = [message.epoch, message.seq];
  const bytes: Uint8Array = message.payload;
  if (info.datagram || info.unreliable) console.log(text, position, bytes.length);
});
stop();
client.onStatus((event: StatusEvent) => {
  const state: ConnectionState = event.state;
  if (state === 'reconnecting' && event.retryAt !== undefined) {
    console.log(`retrying in ${event.retryAt - Date.now()} ms`);
  }
  if (event.transport === 'webtransport') console.log('on QUIC');
});
client.onGap((gap: GapEvent) => {
  const missed: number | null = gap.toSeq === null ? null : gap.toSeq - gap.fromSeq + 1;
  console.log(gap.room, missed, gap.epochChanged);
});
client.onError((error: RoomwireError) => {
  const code: ErrorCode = error.code;
  console.log(code === ErrorCode.RATE_LIMITED);
});

export async function chat(): Promise<void> {
  const connected = await client.connect();
  const user: string = connected.userId;
  const maxFrame: number = connected.limits.maxFrameBytes;
  const joined = await client.join('lobby');
  console.log(user, maxFrame, joined.seq, client.state, client.transport);
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
