//! The order in which a node hands a room's messages to its local members. Pure: no IO, the clock
//! is passed in, and delivery goes through a callback; the mesh calls it under the room's
//! delivery lock.
//!
//! Messages are delivered strictly in `(epoch, seq)` order: older than what was delivered → dropped
//! (stale); the next one → delivered, with whatever it unblocks; further ahead → held (bounded)
//! until the missing ones arrive or the wait ends; a newer epoch → `EpochChanged`, then delivered.
//! A join marker at `(epoch, seq)` is released once everything up to `seq` has been, so the
//! joining member enters exactly there and existing members lose nothing to it.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// Messages held at most while an earlier one is missing.
pub const HOLD_MAX: usize = 4096;

/// What the room's members get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// The message at `(epoch, seq)`.
    Frame { epoch: u64, seq: u64, frame: Bytes },
    /// The room restarted in a new epoch: `previous_seq` is the last one delivered before it.
    EpochChanged {
        previous_epoch: u64,
        previous_seq: u64,
        epoch: u64,
    },
    /// A join marker reached: the member joins at `(epoch, seq)`.
    Join { marker: u64, epoch: u64, seq: u64 },
}

/// What one `accept` did, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Effect {
    /// The message was older than the position: dropped.
    pub stale: bool,
    /// ... and from an older epoch than the position's: sequenced by an owner that had lost the
    /// room by the time it reached NATS (never acknowledged, under the lease rules).
    pub stale_epoch: bool,
    /// Missing messages were given up on (the hold was full).
    pub gap_skipped: bool,
}

/// Held items sort by sequence, a message before the join markers at its position.
type Key = (u64, u8, u64);
const FRAME: u8 = 0;
const MARKER: u8 = 1;

#[derive(Debug, Default)]
pub struct RoomOrder {
    last: Option<(u64, u64)>,
    /// After a NATS reconnect: what was published meanwhile is gone, so the next message is taken
    /// wherever it is, but an epoch change is still announced against the old position.
    resync: bool,
    held: BTreeMap<Key, Option<Bytes>>,
    gap_deadline: Option<Instant>,
}

impl RoomOrder {
    /// The position a joining member can be given at once (`None`: unknown, join through a
    /// marker). Held messages do not matter: they come after it, to every member alike.
    pub fn position(&self) -> Option<(u64, u64)> {
        if self.resync { None } else { self.last }
    }

    /// The epoch of the last message delivered, if any.
    pub fn epoch(&self) -> Option<u64> {
        self.last.map(|(epoch, _)| epoch)
    }

    /// When held messages stop waiting for the missing ones.
    pub fn gap_deadline(&self) -> Option<Instant> {
        self.gap_deadline
    }

    /// The connection to the mesh was lost and is back: deliver what was held (it is all there
    /// will be from before the outage) and take the next message wherever it is.
    pub fn reconnected(&mut self, emit: &mut dyn FnMut(Output)) {
        self.flush_held(emit);
        self.resync = self.last.is_some();
    }

    /// Takes a message (`frame`) or a join marker (`marker`) at `(epoch, seq)`. `wait` is how long
    /// held items wait for a missing message.
    #[allow(clippy::too_many_arguments)]
    pub fn receive(
        &mut self,
        epoch: u64,
        seq: u64,
        frame: Option<Bytes>,
        marker: u64,
        now: Instant,
        wait: Duration,
        emit: &mut dyn FnMut(Output),
    ) -> Effect {
        let mut effect = Effect::default();
        let is_marker = frame.is_none();
        let Some((last_epoch, last_seq)) = self.last else {
            self.last = Some((epoch, seq));
            self.deliver(frame, marker, emit);
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
            self.deliver(frame, marker, emit);
            return effect;
        }
        if epoch < last_epoch || seq <= last_seq {
            if is_marker {
                // Everything up to the marker was delivered already: join at the position (what
                // is held comes after it, to every member alike).
                self.deliver(None, marker, emit);
            } else {
                effect.stale = true;
                effect.stale_epoch = epoch < last_epoch;
            }
            return effect;
        }
        if self.resync || (!is_marker && seq == last_seq.saturating_add(1)) {
            // The next message, or the first after a reconnect (held items below it came
            // before it; the rest of that gap is not coming).
            let later = self
                .held
                .split_off(&(seq, if is_marker { MARKER } else { FRAME }, 0));
            let earlier = std::mem::replace(&mut self.held, later);
            self.emit_in_order(earlier, emit);
            self.last = Some((epoch, seq));
            self.resync = false;
            self.deliver(frame, marker, emit);
            self.release_ready(emit);
            return effect;
        }
        if self.held.len() >= HOLD_MAX {
            self.flush_held(emit);
            effect.gap_skipped = true;
            // Judge the newcomer against the position the flush reached.
            let more = self.receive(epoch, seq, frame, marker, now, wait, emit);
            effect.stale = more.stale;
            effect.stale_epoch = more.stale_epoch;
            return effect;
        }
        let key = if is_marker {
            (seq, MARKER, marker)
        } else {
            (seq, FRAME, 0)
        };
        self.held.insert(key, frame);
        self.gap_deadline.get_or_insert(now + wait);
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

    /// A frame is delivered; a marker joins at the current position.
    fn deliver(&mut self, frame: Option<Bytes>, marker: u64, emit: &mut dyn FnMut(Output)) {
        match frame {
            Some(frame) => {
                let (epoch, seq) = self.last.expect("a position exists");
                emit(Output::Frame { epoch, seq, frame });
            }
            None => {
                let (epoch, seq) = self.last.expect("a position exists");
                emit(Output::Join { marker, epoch, seq });
            }
        }
    }

    fn release_ready(&mut self, emit: &mut dyn FnMut(Output)) {
        while let Some((&(seq, kind, marker), _)) = self.held.first_key_value() {
            let (epoch, last) = self.last.expect("held items imply a position");
            if kind == FRAME && seq == last.saturating_add(1) {
                let frame = self.held.pop_first().and_then(|(_, f)| f);
                self.last = Some((epoch, seq));
                if let Some(frame) = frame {
                    emit(Output::Frame { epoch, seq, frame });
                }
            } else if seq <= last {
                self.held.pop_first();
                if kind == MARKER {
                    emit(Output::Join {
                        marker,
                        epoch,
                        seq: last,
                    });
                }
            } else {
                break;
            }
        }
        if self.held.is_empty() {
            self.gap_deadline = None;
        }
    }

    fn flush_held(&mut self, emit: &mut dyn FnMut(Output)) {
        let held = std::mem::take(&mut self.held);
        self.emit_in_order(held, emit);
        self.gap_deadline = None;
    }

    /// Emits held items in key order, moving the position over the frames.
    fn emit_in_order(&mut self, held: BTreeMap<Key, Option<Bytes>>, emit: &mut dyn FnMut(Output)) {
        for ((seq, kind, marker), frame) in held {
            let Some((epoch, last)) = self.last else {
                continue;
            };
            match frame {
                Some(frame) if kind == FRAME && seq > last => {
                    self.last = Some((epoch, seq));
                    emit(Output::Frame { epoch, seq, frame });
                }
                Some(_) => {}
                None => emit(Output::Join {
                    marker,
                    epoch,
                    seq: last,
                }),
            }
        }
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
            order.receive(epoch, seq, Some(frame(seq)), 0, now, WAIT, &mut |o| {
                out.push(show(o))
            });
        }
        out
    }

    fn show(output: Output) -> String {
        match output {
            Output::Frame { seq, frame, .. } => {
                let text = String::from_utf8(frame.to_vec()).unwrap();
                // The tests' frames carry their own sequence: the position named must match.
                assert_eq!(
                    text,
                    seq.to_string(),
                    "a frame delivered under another position"
                );
                text
            }
            Output::EpochChanged {
                previous_epoch,
                previous_seq,
                epoch,
            } => format!("epoch {previous_epoch}:{previous_seq}->{epoch}"),
            Output::Join { marker, epoch, seq } => format!("join {marker} at {epoch}:{seq}"),
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
    fn only_an_older_epoch_counts_as_a_stale_epoch() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        run(&mut order, &[(1, 1), (1, 2), (5, 1)], now);
        let mut effect =
            |epoch, seq| order.receive(epoch, seq, Some(frame(seq)), 0, now, WAIT, &mut |_| {});
        let duplicate = effect(5, 1);
        assert!(
            duplicate.stale && !duplicate.stale_epoch,
            "a repeat in the epoch"
        );
        let older = effect(1, 3);
        assert!(
            older.stale && older.stale_epoch,
            "a message of the epoch left behind"
        );
    }

    fn marker(
        order: &mut RoomOrder,
        epoch: u64,
        seq: u64,
        marker: u64,
        now: Instant,
    ) -> Vec<String> {
        let mut out = Vec::new();
        order.receive(epoch, seq, None, marker, now, WAIT, &mut |o| {
            out.push(show(o))
        });
        out
    }

    #[test]
    fn a_join_marker_ahead_waits_for_the_messages_before_it() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        run(&mut order, &[(1, 1), (1, 3)], now);
        assert_eq!(marker(&mut order, 1, 4, 9, now), Vec::<String>::new());
        assert_eq!(order.position(), Some((1, 1)));
        assert_eq!(
            run(&mut order, &[(1, 2), (1, 4), (1, 5)], now),
            ["2", "3", "4", "join 9 at 1:4", "5"],
            "existing members lose nothing; the joiner enters after 4"
        );
        assert_eq!(order.position(), Some((1, 5)));
    }

    #[test]
    fn a_join_marker_at_or_behind_the_position_joins_at_once() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        run(&mut order, &[(1, 1), (1, 2)], now);
        assert_eq!(marker(&mut order, 1, 1, 5, now), ["join 5 at 1:2"]);
        assert_eq!(marker(&mut order, 1, 2, 6, now), ["join 6 at 1:2"]);
    }

    #[test]
    fn a_held_marker_is_released_when_the_gap_is_skipped() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        run(&mut order, &[(1, 1)], now);
        marker(&mut order, 1, 3, 7, now);
        let mut out = Vec::new();
        assert!(order.skip_gap(now + WAIT, &mut |o| out.push(show(o))));
        assert_eq!(out, ["join 7 at 1:1"]);
    }

    #[test]
    fn a_full_hold_is_flushed_and_the_newcomer_judged_after_it() {
        let mut order = RoomOrder::default();
        let now = Instant::now();
        run(&mut order, &[(1, 1)], now);
        let last = 3 + HOLD_MAX as u64;
        let ahead: Vec<(u64, u64)> = (3..=last).map(|s| (1, s)).collect();
        // The hold fills with 3.., then the one that does not fit flushes it and follows it.
        assert_eq!(run(&mut order, &ahead, now), numbers(3..=last));
        assert_eq!(
            run(&mut order, &[(1, 2)], now),
            Vec::<String>::new(),
            "too late"
        );
        assert_eq!(order.position(), Some((1, last)));
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
            order.receive(7, 0, None, 0, Instant::now(), WAIT, &mut |_| {});
            let out = run(&mut order, &input, Instant::now());
            prop_assert_eq!(out, numbers(1..=n));
            prop_assert_eq!(order.gap_deadline(), None);
        }
    }
}
