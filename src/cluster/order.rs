//! The order in which a node hands a room's messages to its local members. Pure: no IO, the clock
//! is passed in, and delivery goes through a callback; the mesh calls it under the room's
//! delivery lock.
//!
//! Messages are delivered strictly in `(epoch, seq)` order: older than what was delivered → dropped
//! (stale); the next one → delivered, with whatever it unblocks; further ahead → held (bounded)
//! until the missing ones arrive or the wait ends; a newer epoch → `EpochChanged`, then delivered.
//! Markers (a join sync, an epoch start) move the position without a frame.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// Messages held at most while an earlier one is missing.
pub const HOLD_MAX: usize = 4096;

/// What the room's members get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Frame(Bytes),
    /// The room restarted in a new epoch: `previous_seq` is the last one delivered before it.
    EpochChanged {
        previous_epoch: u64,
        previous_seq: u64,
        epoch: u64,
    },
}

/// What one `accept` did, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Effect {
    /// The message was older than the position: dropped.
    pub stale: bool,
    /// Missing messages were given up on (the hold was full).
    pub gap_skipped: bool,
}

#[derive(Debug, Default)]
pub struct RoomOrder {
    last: Option<(u64, u64)>,
    /// After a NATS reconnect: what was published meanwhile is gone, so the next message is taken
    /// wherever it is, but an epoch change is still announced against the old position.
    resync: bool,
    held: BTreeMap<u64, Bytes>,
    gap_deadline: Option<Instant>,
}

impl RoomOrder {
    /// The position a joining member can be given (`None`: unknown, ask the owner).
    pub fn position(&self) -> Option<(u64, u64)> {
        if self.resync { None } else { self.last }
    }

    /// When held messages stop waiting for the missing ones.
    pub fn gap_deadline(&self) -> Option<Instant> {
        self.gap_deadline
    }

    /// The connection to the mesh was lost and is back: deliver what was held (it is all there
    /// will be before the outage) and take the next message wherever it is.
    pub fn reconnected(&mut self, emit: &mut dyn FnMut(Output)) {
        self.flush_held(emit);
        self.resync = self.last.is_some();
    }

    /// Moves the position to at least `position` without delivering anything (a member joins at
    /// the owner's position on this node); returns the position the member joins at.
    pub fn join_at(&mut self, position: (u64, u64)) -> (u64, u64) {
        let at = match self.last {
            Some(last) if last > position => last,
            _ => position,
        };
        if self.last != Some(at) {
            self.held = self.held.split_off(&(at.1 + 1));
        }
        self.last = Some(at);
        self.resync = false;
        at
    }

    /// Takes `(epoch, seq)`; `frame` is `None` for a marker. `wait` is how long held messages
    /// wait for a missing one.
    pub fn accept(
        &mut self,
        epoch: u64,
        seq: u64,
        frame: Option<Bytes>,
        now: Instant,
        wait: Duration,
        emit: &mut dyn FnMut(Output),
    ) -> Effect {
        let mut effect = Effect::default();
        let Some((last_epoch, last_seq)) = self.last else {
            self.last = Some((epoch, seq));
            if let Some(frame) = frame {
                emit(Output::Frame(frame));
            }
            return effect;
        };
        if epoch > last_epoch {
            self.flush_held(emit);
            let previous_seq = self.last.map_or(last_seq, |l| l.1);
            emit(Output::EpochChanged {
                previous_epoch: last_epoch,
                previous_seq,
                epoch,
            });
            self.last = Some((epoch, seq));
            self.resync = false;
            if let Some(frame) = frame {
                emit(Output::Frame(frame));
            }
        } else if epoch < last_epoch || seq <= last_seq {
            effect.stale = frame.is_some();
        } else if seq == last_seq + 1 || frame.is_none() || self.resync {
            // The next message, a marker, or the first after a reconnect: anything held below
            // it came before it (the rest of that gap is not coming).
            let later = self.held.split_off(&(seq + 1));
            for (_, held) in std::mem::replace(&mut self.held, later) {
                emit(Output::Frame(held));
            }
            self.last = Some((epoch, seq));
            self.resync = false;
            if let Some(frame) = frame {
                emit(Output::Frame(frame));
            }
            self.release_ready(emit);
        } else if let Some(frame) = frame {
            if self.held.len() >= HOLD_MAX {
                self.flush_held(emit);
                effect.gap_skipped = true;
            }
            self.held.insert(seq, frame);
            self.gap_deadline.get_or_insert(now + wait);
        }
        effect
    }

    /// Gives up on the missing messages once the wait is over; true when it did.
    pub fn skip_gap(&mut self, now: Instant, emit: &mut dyn FnMut(Output)) -> bool {
        if self.gap_deadline.is_some_and(|d| d <= now) {
            self.flush_held(emit);
            true
        } else {
            false
        }
    }

    fn release_ready(&mut self, emit: &mut dyn FnMut(Output)) {
        while let Some((epoch, last)) = self.last {
            let Some(frame) = self.held.remove(&(last + 1)) else {
                break;
            };
            self.last = Some((epoch, last + 1));
            emit(Output::Frame(frame));
        }
        if let Some((_, last)) = self.last {
            self.held = self.held.split_off(&(last + 1));
        }
        if self.held.is_empty() {
            self.gap_deadline = None;
        }
    }

    fn flush_held(&mut self, emit: &mut dyn FnMut(Output)) {
        for (seq, frame) in std::mem::take(&mut self.held) {
            if let Some((epoch, _)) = self.last {
                self.last = Some((epoch, seq));
            }
            emit(Output::Frame(frame));
        }
        self.gap_deadline = None;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const WAIT: Duration = Duration::from_millis(500);

    fn frame(seq: u64) -> Bytes {
        Bytes::from(seq.to_string())
    }

    /// Feeds (epoch, seq) messages; returns what members got, as strings.
    fn run(order: &mut RoomOrder, input: &[(u64, u64)], now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        for &(epoch, seq) in input {
            order.accept(epoch, seq, Some(frame(seq)), now, WAIT, &mut |o| {
                out.push(show(o))
            });
        }
        out
    }

    fn show(output: Output) -> String {
        match output {
            Output::Frame(f) => String::from_utf8(f.to_vec()).unwrap(),
            Output::EpochChanged {
                previous_epoch,
                previous_seq,
                epoch,
            } => format!("epoch {previous_epoch}:{previous_seq}->{epoch}"),
        }
    }

    fn numbers(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
        range.map(|n| n.to_string()).collect()
    }

    #[test]
    fn in_order_messages_pass_and_old_ones_are_dropped() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        assert_eq!(
            run(&mut order, &[(1, 1), (1, 2), (1, 2), (1, 1), (1, 3)], now),
            numbers(1..=3)
        );
        assert_eq!(order.position(), Some((1, 3)));
    }

    #[test]
    fn a_message_ahead_waits_for_the_missing_one() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        assert_eq!(run(&mut order, &[(1, 1), (1, 3), (1, 4)], now), ["1"]);
        assert_eq!(order.gap_deadline(), Some(now + WAIT));
        assert_eq!(run(&mut order, &[(1, 2)], now), numbers(2..=4));
        assert_eq!(order.gap_deadline(), None);
    }

    #[test]
    fn a_gap_is_skipped_when_the_wait_ends() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        run(&mut order, &[(1, 1), (1, 3), (1, 5)], now);
        let mut out = Vec::new();
        assert!(!order.skip_gap(now, &mut |o| out.push(show(o))));
        assert!(order.skip_gap(now + WAIT, &mut |o| out.push(show(o))));
        assert_eq!(out, ["3", "5"]);
        assert_eq!(order.position(), Some((1, 5)));
        assert_eq!(
            run(&mut order, &[(1, 2), (1, 6)], now),
            ["6"],
            "2 is stale now"
        );
    }

    #[test]
    fn a_newer_epoch_is_announced_once_and_an_older_one_dropped() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        let out = run(&mut order, &[(1, 1), (1, 2), (5, 1), (1, 3), (5, 2)], now);
        assert_eq!(out, ["1", "2", "epoch 1:2->5", "1", "2"]);
    }

    #[test]
    fn a_marker_moves_the_position_past_a_gap() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        run(&mut order, &[(1, 1), (1, 3)], now);
        let mut out = Vec::new();
        order.accept(1, 4, None, now, WAIT, &mut |o| out.push(show(o)));
        assert_eq!(
            out,
            ["3"],
            "held messages below the marker are delivered first"
        );
        assert_eq!(order.position(), Some((1, 4)));
        assert_eq!(run(&mut order, &[(1, 5)], now), ["5"]);
    }

    #[test]
    fn after_a_reconnect_the_next_message_is_taken_and_an_epoch_change_announced() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        run(&mut order, &[(1, 1), (1, 2)], now);
        order.reconnected(&mut |_| {});
        assert_eq!(order.position(), None, "not a join position until resynced");
        assert_eq!(
            run(&mut order, &[(1, 9)], now),
            ["9"],
            "same epoch: no waiting"
        );
        order.reconnected(&mut |_| {});
        assert_eq!(
            run(&mut order, &[(7, 3), (7, 4)], now),
            ["epoch 1:9->7", "3", "4"]
        );
    }

    #[test]
    fn joining_at_the_owner_position_drops_what_came_before() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        run(&mut order, &[(1, 1), (1, 4)], now);
        assert_eq!(order.join_at((1, 5)), (1, 5));
        assert_eq!(run(&mut order, &[(1, 5), (1, 6)], now), ["6"]);
    }

    proptest! {
        /// However messages are shuffled within a window smaller than the hold, members get each
        /// one once, in sequence order, with no gap.
        #[test]
        fn shuffled_messages_come_out_in_order(n in 1u64..300, seed in any::<u64>(), window in 1usize..40) {
            let mut input: Vec<(u64, u64)> = (1..=n).map(|s| (7, s)).collect();
            let mut state = seed | 1;
            for chunk in input.chunks_mut(window) {
                for i in (1..chunk.len()).rev() {
                    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                    chunk.swap(i, (state % (i as u64 + 1)) as usize);
                }
            }
            let mut order = RoomOrder::default();
            order.join_at((7, 0));
            let out = run(&mut order, &input, Instant::now());
            prop_assert_eq!(out, numbers(1..=n));
            prop_assert_eq!(order.gap_deadline(), None);
        }
    }
}
