//! Where the recent records of each room are in its stream, so most resumes skip the binary
//! search (see [`Index`]).

use std::collections::{HashMap, VecDeque};

use crate::room::RoomName;

/// Rooms whose recent records' stream sequences are remembered, at most (past it, all are
/// forgotten at once), and records remembered per room.
const INDEX_ROOMS: usize = 20_000;
const INDEX_PER_ROOM: usize = 64;

/// The stream sequences of the records of each room this node appended or read most recently,
/// in position order: a member that comes back from a recent position (most do, and a storm of
/// them from the same few) is found without a binary search over the stream.
#[derive(Default)]
pub(super) struct Index(HashMap<RoomName, VecDeque<IndexEntry>>);

/// A record's position and its stream sequence.
type IndexEntry = ((u64, u64), u64);

impl Index {
    pub(super) fn remember(&mut self, room: &RoomName, position: (u64, u64), stream_seq: u64) {
        if !self.0.contains_key(room) && self.0.len() >= INDEX_ROOMS {
            self.0.clear();
        }
        let known = self.0.entry(room.clone()).or_default();
        let i = known.partition_point(|(p, _)| *p < position);
        if known.get(i).is_some_and(|(p, _)| *p == position) {
            return;
        }
        known.insert(i, (position, stream_seq));
        if known.len() > INDEX_PER_ROOM {
            known.pop_front();
        }
    }

    pub(super) fn find(&self, room: &RoomName, position: (u64, u64)) -> Option<u64> {
        let known = self.0.get(room)?;
        let i = known.partition_point(|(p, _)| *p < position);
        known
            .get(i)
            .filter(|(p, _)| *p == position)
            .map(|(_, seq)| *seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::parse_any(name, 128).unwrap()
    }

    #[test]
    fn positions_are_found_in_any_order_they_were_learned_and_bounded_per_room() {
        let mut index = Index::default();
        let r = room("chat.a");
        index.remember(&r, (1, 5), 50);
        index.remember(&r, (1, 3), 30);
        index.remember(&r, (2, 0), 60);
        assert_eq!(index.find(&r, (1, 3)), Some(30));
        assert_eq!(index.find(&r, (1, 5)), Some(50));
        assert_eq!(index.find(&r, (2, 0)), Some(60));
        assert_eq!(index.find(&r, (1, 4)), None);
        assert_eq!(index.find(&room("chat.b"), (1, 3)), None);
        for seq in 10..10 + INDEX_PER_ROOM as u64 {
            index.remember(&r, (3, seq), 100 + seq);
        }
        assert_eq!(index.find(&r, (1, 3)), None, "the oldest go first");
        assert_eq!(index.find(&r, (3, 10)), Some(110));
    }
}
