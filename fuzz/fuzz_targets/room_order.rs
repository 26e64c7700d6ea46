//! RoomOrder (cluster/order.rs), the order in which a node hands a room's messages to its
//! members, driven by arbitrary sequences of messages, join markers, clock steps, gap skips and
//! reconnects. Checked after every step:
//! - every frame goes out under its own position, strictly after everything before it;
//! - a join is at the position of the last thing delivered; an epoch change announces exactly it;
//! - a message reported stale is at or behind that position, and only those are dropped: once
//!   the rest is flushed, every message not reported stale was delivered, and every join marker
//!   released;
//! - `position` is the last position delivered (or unknown); nothing is held without a deadline.
#![no_main]

use std::collections::BTreeSet;
use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use roomwire::fuzzing::{HOLD_MAX, Output, RoomOrder};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_millis(500);

#[derive(Arbitrary, Debug)]
enum Op {
    /// A message at a small position (collisions and near misses are the interesting part).
    Message {
        epoch: u8,
        seq: u8,
    },
    /// A message anywhere, the ends of the range included.
    Far {
        epoch: u64,
        seq: u64,
    },
    Marker {
        epoch: u8,
        seq: u8,
        marker: u64,
    },
    /// Messages `from..from + count` of an epoch, in order or reversed: enough to fill the hold.
    Burst {
        epoch: u8,
        from: u16,
        count: u16,
        reverse: bool,
    },
    Advance {
        ms: u16,
    },
    SkipGap,
    Reconnected,
}

fn frame(epoch: u64, seq: u64) -> Bytes {
    let mut bytes = epoch.to_be_bytes().to_vec();
    bytes.extend_from_slice(&seq.to_be_bytes());
    Bytes::from(bytes)
}

#[derive(Default)]
struct Members {
    /// Position of the last frame or join delivered.
    last: Option<(u64, u64)>,
    delivered: BTreeSet<(u64, u64)>,
    joined: BTreeSet<u64>,
}

impl Members {
    fn take(&mut self, output: Output) {
        match output {
            Output::Frame { epoch, seq, frame } => {
                assert_eq!(
                    frame,
                    self::frame(epoch, seq),
                    "a frame under another position"
                );
                assert!(
                    self.last.is_none_or(|last| (epoch, seq) > last),
                    "frame {epoch}:{seq} after {:?}",
                    self.last
                );
                self.last = Some((epoch, seq));
                assert!(self.delivered.insert((epoch, seq)));
            }
            Output::Join { marker, epoch, seq } => {
                assert!(
                    self.last.is_none_or(|last| (epoch, seq) >= last),
                    "join {marker} at {epoch}:{seq} after {:?}",
                    self.last
                );
                self.last = Some((epoch, seq));
                self.joined.insert(marker);
            }
            Output::EpochChanged {
                previous_epoch,
                previous_seq,
                epoch,
            } => {
                assert!(epoch > previous_epoch);
                assert_eq!(self.last, Some((previous_epoch, previous_seq)));
            }
        }
    }
}

struct Run {
    order: RoomOrder,
    members: Members,
    now: Instant,
    /// Messages not reported stale, and markers received.
    expected: BTreeSet<(u64, u64)>,
    markers: BTreeSet<u64>,
}

impl Run {
    fn receive(&mut self, epoch: u64, seq: u64, marker: Option<u64>) {
        let before = self.members.last;
        let members = &mut self.members;
        let effect = self.order.receive(
            epoch,
            seq,
            marker.is_none().then(|| frame(epoch, seq)),
            marker.unwrap_or(0),
            self.now,
            WAIT,
            &mut |o| members.take(o),
        );
        match marker {
            Some(marker) => {
                assert!(!effect.stale, "a marker is never stale");
                self.markers.insert(marker);
            }
            None if effect.stale => {
                // Judged against the position before, or, when the hold overflowed, after the
                // flush it caused.
                let at = if effect.gap_skipped {
                    self.members.last
                } else {
                    before
                };
                let at = at.expect("stale needs a position");
                assert!((epoch, seq) <= at, "{epoch}:{seq} stale at {at:?}");
                assert_eq!(effect.stale_epoch, epoch < at.0);
            }
            None => {
                assert!(!effect.stale_epoch);
                self.expected.insert((epoch, seq));
            }
        }
        self.check();
    }

    fn check(&self) {
        if let Some(position) = self.order.position() {
            assert_eq!(Some(position), self.members.last);
        }
        assert_eq!(self.order.epoch(), self.members.last.map(|l| l.0));
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut run = Run {
        order: RoomOrder::default(),
        members: Members::default(),
        now: Instant::now(),
        expected: BTreeSet::new(),
        markers: BTreeSet::new(),
    };
    for op in ops.into_iter().take(256) {
        match op {
            Op::Message { epoch, seq } => run.receive(epoch.into(), seq.into(), None),
            Op::Far { epoch, seq } => run.receive(epoch, seq, None),
            Op::Marker { epoch, seq, marker } => {
                run.receive(epoch.into(), seq.into(), Some(marker))
            }
            Op::Burst {
                epoch,
                from,
                count,
                reverse,
            } => {
                let count = u64::from(count) % (HOLD_MAX as u64 + 64);
                let seqs = (0..count).map(|i| u64::from(from) + i);
                let seqs: Vec<u64> = if reverse {
                    seqs.rev().collect()
                } else {
                    seqs.collect()
                };
                for seq in seqs {
                    run.receive(epoch.into(), seq, None);
                }
            }
            Op::Advance { ms } => run.now += Duration::from_millis(ms.into()),
            Op::SkipGap => {
                let deadline = run.order.gap_deadline();
                let members = &mut run.members;
                let skipped = run.order.skip_gap(run.now, &mut |o| members.take(o));
                assert_eq!(skipped, deadline.is_some_and(|d| d <= run.now));
                if skipped {
                    assert_eq!(run.order.gap_deadline(), None);
                }
                run.check();
            }
            Op::Reconnected => {
                let members = &mut run.members;
                run.order.reconnected(&mut |o| members.take(o));
                assert_eq!(run.order.gap_deadline(), None);
                assert_eq!(run.order.position(), None);
            }
        }
    }
    // Nothing waits without a deadline: with none set, the final flush releases nothing.
    let idle = run.order.gap_deadline().is_none();
    let (members, mut released) = (&mut run.members, 0);
    run.order.reconnected(&mut |o| {
        released += 1;
        members.take(o);
    });
    assert!(!idle || released == 0, "{released} held without a deadline");
    assert_eq!(
        run.members.delivered, run.expected,
        "delivered = received and not stale"
    );
    assert_eq!(run.members.joined, run.markers, "every marker joined");
});
