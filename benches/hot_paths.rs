//! Micro-benchmarks of the hot pure parts: frame encode and decode, the fan-out of one encoded
//! message into 10,000 local sessions' queues, and the ring's owner lookup. Run with `cargo bench --bench hot_paths`.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use roomwire::RoomName;
use roomwire::Transport;
use roomwire::proto::{self, ClientFrame, ServerFrame, client_frame, server_frame};
use roomwire::{Config, Node};

fn message_frame(payload: usize) -> ServerFrame {
    ServerFrame::reply(
        0,
        server_frame::Kind::Message(proto::Message {
            room: "chat.eu.lobby".into(),
            epoch: 1_795_304_505_427,
            seq: 123_456,
            payload: Bytes::from(vec![7u8; payload]),
            publisher: "user-42".into(),
            server_time_ms: 1_795_304_505_427,
            client_msg_id: "m-0001".into(),
        }),
    )
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for size in [64usize, 1024] {
        let frame = message_frame(size);
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("encode_message_{size}B"), |b| {
            b.iter(|| black_box(&frame).encode_shared())
        });
        let publish = ClientFrame {
            request_id: 9,
            kind: Some(client_frame::Kind::Publish(proto::Publish {
                room: "chat.eu.lobby".into(),
                payload: Bytes::from(vec![7u8; size]),
                client_msg_id: "m-0001".into(),
                unreliable: false,
            })),
        }
        .encode_bytes();
        group.bench_function(format!("decode_publish_{size}B"), |b| {
            b.iter(|| ClientFrame::decode_bytes(black_box(publish.clone())).unwrap())
        });
    }
    group.finish();
}

fn fanout(c: &mut Criterion) {
    const SESSIONS: usize = 10_000;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ctx = runtime.block_on(async {
        let mut config = Config::default();
        config.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
        config.webtransport.enabled = false;
        config.api.keys = vec!["bench-key-0123456789".into()];
        Node::bind(config).await.unwrap().context()
    });
    let room = RoomName::parse_client("bench.room", 128).unwrap();
    let peer = "127.0.0.1:1".parse().unwrap();
    let mut handles = Vec::with_capacity(SESSIONS);
    for key in 0..SESSIONS as u64 {
        let handle = ctx.new_member(
            key,
            Arc::from(format!("u{key}")),
            Transport::WebSocket,
            peer,
            String::new(),
        );
        ctx.hub.add(&room, &handle);
        handles.push(handle);
    }
    let bytes = message_frame(64).encode_shared();
    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements(SESSIONS as u64));
    group.bench_function("deliver_64B_to_10k_sessions", |b| {
        b.iter_batched(
            || {
                // Drain the queues between iterations (not timed) so none fills up.
                for handle in &handles {
                    handle.written(&handle.take_queued(usize::MAX));
                }
            },
            |()| assert_eq!(ctx.hub.deliver(&room, &bytes), SESSIONS),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn ring(c: &mut Criterion) {
    let nodes: Vec<String> = (0..16).map(|i| format!("node-{i}")).collect();
    let ring = roomwire::Ring::new(&nodes, roomwire::DEFAULT_VNODES);
    let rooms: Vec<String> = (0..1024).map(|i| format!("chat.room-{i}")).collect();
    let mut i = 0;
    c.bench_function("ring/owner_of_room_16_nodes", |b| {
        b.iter(|| {
            i = (i + 1) % rooms.len();
            black_box(ring.owner(&rooms[i]))
        })
    });
}

criterion_group!(benches, codec, fanout, ring);
criterion_main!(benches);
