//! The header of a message on a room's NATS subject (cluster/mesh/wire.rs): whatever arrives
//! there is parsed or refused, never a panic, and what parses is what the writers wrote.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use roomwire::fuzzing::{
    HEADER, KIND_EPOCH, KIND_MESSAGE, KIND_SYNC, KIND_UNRELIABLE, RoomMessage, epoch_marker,
    header, join_marker,
};

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    match RoomMessage::parse(&payload) {
        None => {
            // Refused: empty, an unknown kind, or an ordered kind shorter than its header.
            assert!(
                data.is_empty()
                    || !matches!(
                        data[0],
                        KIND_MESSAGE | KIND_UNRELIABLE | KIND_SYNC | KIND_EPOCH
                    )
                    || data.len() < HEADER
            );
        }
        Some(RoomMessage::Unreliable(frame)) => {
            assert_eq!(data[0], KIND_UNRELIABLE);
            assert_eq!(frame, data[1..]);
        }
        Some(RoomMessage::Ordered {
            epoch,
            seq,
            frame,
            marker,
        }) => {
            // Written again by the writers, the message reads the same.
            let kind = data[0];
            assert_eq!(header(kind, epoch, seq), data[..HEADER]);
            let rewritten = match kind {
                KIND_MESSAGE => {
                    let frame = frame.clone().expect("a message carries its frame");
                    assert_eq!(frame, data[HEADER..]);
                    let mut bytes = header(kind, epoch, seq).to_vec();
                    bytes.extend_from_slice(&frame);
                    Bytes::from(bytes)
                }
                KIND_SYNC => {
                    assert!(frame.is_none());
                    join_marker(epoch, seq, marker)
                }
                KIND_EPOCH => {
                    assert!(frame.is_none() && marker == 0);
                    // An epoch marker is written at seq 0; read with any seq.
                    let mut bytes = epoch_marker(epoch).to_vec();
                    bytes[HEADER - 8..].copy_from_slice(&seq.to_be_bytes());
                    Bytes::from(bytes)
                }
                other => panic!("kind {other} parsed as ordered"),
            };
            assert_eq!(
                RoomMessage::parse(&rewritten),
                Some(RoomMessage::Ordered {
                    epoch,
                    seq,
                    frame,
                    marker
                })
            );
        }
    }
});
