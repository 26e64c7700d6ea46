//! The mesh's own wire formats, pure and tested: the header of a message on a room's subject, and
//! a room's state as a hand-off carries it. The node-to-node requests themselves are Protobuf
//! (`proto/roomwire/mesh/v1/mesh.proto`).
//!
//! The room-subject format is `pub` (in this private module) only so that `crate::fuzzing` can
//! re-export it to the fuzz targets.

use std::sync::Arc;

use bytes::Bytes;

use crate::cluster::BusError;
use crate::proto::mesh as wire;
use crate::room::{OwnedRoom, Remembered, RoomName};

/// First byte of a room-subject message: a sequenced message, then epoch and seq (u64 big
/// endian), then the encoded `ServerFrame` exactly as members receive it.
pub const KIND_MESSAGE: u8 = 1;
/// An unreliable message: the encoded `ServerFrame` follows the kind byte.
pub const KIND_UNRELIABLE: u8 = 2;
/// A join marker at (epoch, seq), then its 8-byte id.
pub const KIND_SYNC: u8 = 3;
/// A new epoch starts here: (epoch, 0).
pub const KIND_EPOCH: u8 = 4;
/// Kind, epoch, seq.
pub const HEADER: usize = 17;
/// NATS header naming the node that sent an unreliable message: it delivered the message to its
/// own members when it sent it, and skips it when NATS echoes it back. (Sequenced messages reach
/// the owner's members through NATS like everyone else's.)
pub(super) const ORIGIN_HEADER: &str = "Roomwire-Origin";

/// The header of an ordered room-subject message.
pub fn header(kind: u8, epoch: u64, seq: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = kind;
    h[1..9].copy_from_slice(&epoch.to_be_bytes());
    h[9..17].copy_from_slice(&seq.to_be_bytes());
    h
}

/// A join marker: the owner's position and the marker's id.
pub fn join_marker(epoch: u64, seq: u64, marker: u64) -> Bytes {
    let mut bytes = header(KIND_SYNC, epoch, seq).to_vec();
    bytes.extend_from_slice(&marker.to_be_bytes());
    Bytes::from(bytes)
}

/// The marker that opens a new epoch.
pub fn epoch_marker(epoch: u64) -> Bytes {
    Bytes::copy_from_slice(&header(KIND_EPOCH, epoch, 0))
}

/// A message received on a room's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomMessage {
    /// An unreliable frame, to fan out as it is.
    Unreliable(Bytes),
    /// A sequenced message (`frame`), a join marker (`marker` non-zero) or an epoch's start, at
    /// `(epoch, seq)` in the room's order.
    Ordered {
        epoch: u64,
        seq: u64,
        frame: Option<Bytes>,
        marker: u64,
    },
}

impl RoomMessage {
    /// Parses a room-subject payload; `None` for anything malformed (ignored and logged).
    pub fn parse(payload: &Bytes) -> Option<RoomMessage> {
        let kind = *payload.first()?;
        if kind == KIND_UNRELIABLE {
            return Some(RoomMessage::Unreliable(payload.slice(1..)));
        }
        if !matches!(kind, KIND_MESSAGE | KIND_SYNC | KIND_EPOCH) || payload.len() < HEADER {
            return None;
        }
        let epoch = read_u64(payload, 1)?;
        let seq = read_u64(payload, 9)?;
        let frame = (kind == KIND_MESSAGE).then(|| payload.slice(HEADER..));
        let marker = match kind {
            KIND_SYNC => read_u64(payload, HEADER).unwrap_or(0),
            _ => 0,
        };
        Some(RoomMessage::Ordered {
            epoch,
            seq,
            frame,
            marker,
        })
    }
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// One step of routing a request to a room's owner.
pub(super) enum Step<T> {
    Done(T),
    /// Try again (after a pause) while the deadline allows: the reason is reported if it does not.
    Retry(String),
    Fail(BusError),
}

/// A room's state as a hand-off carries it. Remembered client message ids travel with their age
/// (no clocks compared), and with the Unix time older nodes read (`at_ms`, from `wall_ms`).
pub(super) fn export(
    room: &RoomName,
    state: &OwnedRoom,
    now_ms: u64,
    wall_ms: u64,
) -> wire::RoomState {
    let (epoch, seq) = state.position();
    wire::RoomState {
        room: room.to_string(),
        epoch,
        seq,
        dedupe: state
            .remembered(now_ms)
            .map(|entry| wire::DedupeEntry {
                publisher: entry.publisher.to_string(),
                client_msg_id: entry.client_msg_id,
                seq: entry.seq,
                at_ms: wall_ms.saturating_sub(entry.age_ms),
                age_ms: entry.age_ms,
                age_present: true,
            })
            .collect(),
    }
}

/// The room a hand-off carried, continued here at `now_ms` (monotonic); the remembered ids keep
/// their age by this node's wall clock at `wall_ms`.
pub(super) fn import(state: &wire::RoomState, now_ms: u64, wall_ms: u64) -> OwnedRoom {
    let remembered = state.dedupe.iter().map(|entry| Remembered {
        publisher: Arc::from(entry.publisher.as_str()),
        client_msg_id: entry.client_msg_id.clone(),
        seq: entry.seq,
        // From a protocol-3 node the age itself; from an older one, by comparing wall clocks.
        age_ms: if entry.age_present {
            entry.age_ms
        } else {
            wall_ms.saturating_sub(entry.at_ms)
        },
    });
    OwnedRoom::resume(state.epoch, state.seq, remembered, now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::{DedupeRules, Publication, Sequencing};

    #[test]
    fn room_messages_round_trip_and_malformed_ones_are_refused() {
        let mut message = header(KIND_MESSAGE, 7, 9).to_vec();
        message.extend_from_slice(b"frame");
        assert_eq!(
            RoomMessage::parse(&Bytes::from(message)),
            Some(RoomMessage::Ordered {
                epoch: 7,
                seq: 9,
                frame: Some(Bytes::from_static(b"frame")),
                marker: 0
            })
        );
        assert_eq!(
            RoomMessage::parse(&join_marker(7, 9, 42)),
            Some(RoomMessage::Ordered {
                epoch: 7,
                seq: 9,
                frame: None,
                marker: 42
            })
        );
        assert_eq!(
            RoomMessage::parse(&epoch_marker(8)),
            Some(RoomMessage::Ordered {
                epoch: 8,
                seq: 0,
                frame: None,
                marker: 0
            })
        );
        assert_eq!(
            RoomMessage::parse(&Bytes::from_static(&[KIND_UNRELIABLE, 1, 2])),
            Some(RoomMessage::Unreliable(Bytes::from_static(&[1, 2])))
        );
        for bad in [&[][..], &[KIND_MESSAGE, 0, 0], &[9; 20], &[KIND_EPOCH; 16]] {
            assert_eq!(
                RoomMessage::parse(&Bytes::copy_from_slice(bad)),
                None,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_handed_over_room_keeps_its_position_and_its_remembered_ids() {
        let room = RoomName::parse_client("lobby", 128).unwrap();
        let rules = DedupeRules {
            window_ms: 10_000,
            max: 10,
        };
        let mut owned = OwnedRoom::new(5, 100);
        let p = Publication {
            room: room.clone(),
            payload: Bytes::from_static(b"x"),
            publisher: "alice".into(),
            client_msg_id: "m1".into(),
            trace: Default::default(),
        };
        owned
            .sequence(&p, 100, 0, &rules, || Ok::<(), ()>(()))
            .unwrap();
        // Sent at wall 50_000, 400 ms after the id was recorded.
        let state = export(&room, &owned, 500, 50_000);
        assert_eq!((state.epoch, state.seq), (5, 1));
        assert_eq!(state.dedupe[0].at_ms, 49_600);
        // Received on a node whose clocks read otherwise.
        let mut taken = import(&state, 7_000, 50_100);
        assert_eq!(taken.position(), (5, 1));
        assert_eq!(
            taken.sequence(&p, 7_001, 0, &rules, || Ok::<(), ()>(())),
            Ok(Sequencing::Duplicate { epoch: 5, seq: 1 })
        );
    }
}
