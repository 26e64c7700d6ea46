//! The recent messages a room's owner keeps in memory (a `memory` history class, and a `durable`
//! one when there is no JetStream), and what a member that comes back can be given from them.
//! Pure: the caller passes the time (monotonic milliseconds).

use std::collections::VecDeque;

use bytes::Bytes;

use super::History;

/// Kept messages, oldest first; all of one epoch (a room's state, and its window, start anew
/// with a new epoch).
#[derive(Debug, Default)]
pub struct Window {
    kept: VecDeque<Kept>,
    bytes: u64,
    max_messages: u64,
    max_age_ms: u64,
    max_bytes: u64,
}

#[derive(Debug, Clone)]
struct Kept {
    seq: u64,
    /// The encoded `ServerFrame` members received: replayed as it is.
    frame: Bytes,
    at_ms: u64,
}

/// Where a member that comes back with a position stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Everything after its position is here: these sequences follow (none: it missed nothing).
    Recovered { from_seq: u64, to_seq: u64 },
    /// Its position is older than what is kept, or of another epoch: the oldest position kept is
    /// `(epoch, oldest_seq)` (the room's current position when nothing is kept).
    Reset { epoch: u64, oldest_seq: u64 },
}

impl Window {
    /// A window with the limits of a history class.
    pub fn new(history: &History) -> Self {
        Self {
            kept: VecDeque::new(),
            bytes: 0,
            max_messages: history.max_messages,
            max_age_ms: history.max_age_ms,
            max_bytes: history.max_bytes,
        }
    }

    /// Keeps message `seq` (its encoded frame), dropping the oldest past the count and byte
    /// limits.
    pub fn keep(&mut self, seq: u64, frame: Bytes, now_ms: u64) {
        self.bytes += frame.len() as u64;
        self.kept.push_back(Kept {
            seq,
            frame,
            at_ms: now_ms,
        });
        while self.kept.len() as u64 > self.max_messages || self.bytes > self.max_bytes {
            self.drop_oldest();
        }
    }

    fn drop_oldest(&mut self) {
        if let Some(old) = self.kept.pop_front() {
            self.bytes -= old.frame.len() as u64;
        }
    }

    /// Drops messages past the age limit.
    fn expire(&mut self, now_ms: u64) {
        while self
            .kept
            .front()
            .is_some_and(|k| now_ms.saturating_sub(k.at_ms) >= self.max_age_ms)
        {
            self.drop_oldest();
        }
    }

    /// The first sequence kept, if any.
    pub fn oldest(&mut self, now_ms: u64) -> Option<u64> {
        self.expire(now_ms);
        self.kept.front().map(|k| k.seq)
    }

    /// Where a member whose last message was `(since_epoch, since_seq)` stands, when the room is
    /// at `(epoch, seq)`.
    pub fn recovery(
        &mut self,
        since_epoch: u64,
        since_seq: u64,
        epoch: u64,
        seq: u64,
        now_ms: u64,
    ) -> Recovery {
        let oldest = self.oldest(now_ms);
        let reset = Recovery::Reset {
            epoch,
            oldest_seq: oldest.unwrap_or(seq),
        };
        if since_epoch != epoch {
            return reset;
        }
        if since_seq >= seq {
            return Recovery::Recovered {
                from_seq: seq + 1,
                to_seq: seq,
            };
        }
        match oldest {
            Some(oldest) if oldest <= since_seq + 1 => Recovery::Recovered {
                from_seq: since_seq + 1,
                to_seq: seq,
            },
            _ => reset,
        }
    }

    /// Up to `limit` kept frames after `after_seq`, oldest first, with the last sequence given.
    pub fn after(&mut self, after_seq: u64, limit: usize, now_ms: u64) -> Vec<(u64, Bytes)> {
        self.expire(now_ms);
        let start = self.kept.partition_point(|k| k.seq <= after_seq);
        self.kept
            .iter()
            .skip(start)
            .take(limit)
            .map(|k| (k.seq, k.frame.clone()))
            .collect()
    }

    /// Up to `limit` kept frames before `before_seq`, newest first.
    pub fn before(&mut self, before_seq: u64, limit: usize, now_ms: u64) -> Vec<(u64, Bytes)> {
        self.expire(now_ms);
        let end = self.kept.partition_point(|k| k.seq < before_seq);
        self.kept
            .iter()
            .take(end)
            .rev()
            .take(limit)
            .map(|k| (k.seq, k.frame.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::HistoryMode;

    fn window(messages: u64, age: u64, bytes: u64) -> Window {
        Window::new(&History {
            class: Arc::from("t"),
            mode: HistoryMode::Memory,
            max_messages: messages,
            max_age_ms: age,
            max_bytes: bytes,
            presence: None,
        })
    }

    fn frame(seq: u64) -> Bytes {
        Bytes::from(vec![seq as u8; 10])
    }

    fn seqs(frames: &[(u64, Bytes)]) -> Vec<u64> {
        frames.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn the_window_keeps_the_newest_within_its_count_bytes_and_age() {
        let mut w = window(3, 1_000, 1_000);
        for seq in 1..=5 {
            w.keep(seq, frame(seq), seq * 100);
        }
        assert_eq!(seqs(&w.after(0, 10, 500)), [3, 4, 5]);
        assert_eq!(seqs(&w.after(3, 10, 500)), [4, 5]);
        assert_eq!(seqs(&w.before(5, 10, 500)), [4, 3]);
        assert_eq!(w.oldest(1_350), Some(4), "3 is 1,050 ms old");
        let mut small = window(100, 1_000, 25);
        for seq in 1..=3 {
            small.keep(seq, frame(seq), 0);
        }
        assert_eq!(seqs(&small.after(0, 10, 0)), [2, 3], "30 bytes > 25");
    }

    #[test]
    fn a_member_recovers_only_what_the_window_holds_in_the_same_epoch() {
        let mut w = window(3, 10_000, 10_000);
        for seq in 4..=6 {
            w.keep(seq, frame(seq), 0);
        }
        assert_eq!(
            w.recovery(9, 3, 9, 6, 0),
            Recovery::Recovered {
                from_seq: 4,
                to_seq: 6
            }
        );
        assert_eq!(
            w.recovery(9, 6, 9, 6, 0),
            Recovery::Recovered {
                from_seq: 7,
                to_seq: 6
            },
            "nothing missed"
        );
        assert_eq!(
            w.recovery(9, 2, 9, 6, 0),
            Recovery::Reset {
                epoch: 9,
                oldest_seq: 4
            },
            "3 was dropped"
        );
        assert_eq!(
            w.recovery(8, 6, 9, 6, 0),
            Recovery::Reset {
                epoch: 9,
                oldest_seq: 4
            },
            "another epoch"
        );
        let mut empty = window(3, 10_000, 10_000);
        assert_eq!(
            empty.recovery(9, 1, 9, 6, 0),
            Recovery::Reset {
                epoch: 9,
                oldest_seq: 6
            }
        );
    }
}
