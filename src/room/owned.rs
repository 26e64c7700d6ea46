//! A room on its owner: its position (epoch, last sequence), the memory of recent client message
//! ids that makes a retried publish idempotent, and when it was last used. Pure: the caller
//! passes the clocks in (monotonic milliseconds for windows and idleness, wall milliseconds for
//! the timestamp members see).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use prost::Message as _;

use super::{Publication, Recovery, Window};
use crate::proto::{self, ServerFrame};

/// How long and how many (publisher, client message id) pairs a room remembers
/// (`rooms.dedupe_window_ms`, `rooms.dedupe_max_per_room`).
#[derive(Debug, Clone, Copy)]
pub struct DedupeRules {
    pub window_ms: u64,
    pub max: usize,
}

/// What [`OwnedRoom::sequence`] did with a publication.
#[derive(Debug, Clone, PartialEq)]
pub enum Sequencing {
    /// A retry of an earlier (publisher, client message id) within the window: the original's
    /// position; nothing is delivered again.
    Duplicate { epoch: u64, seq: u64 },
    /// A new message at `(epoch, seq)`, and the one frame every member receives.
    New {
        epoch: u64,
        seq: u64,
        frame: ServerFrame,
    },
}

/// Which part of a room's history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The newest messages, newest first.
    Newest,
    /// Messages after `(epoch, seq)`, oldest first.
    After(u64, u64),
    /// Messages before `(epoch, seq)`, newest first.
    Before(u64, u64),
}

/// One kept message: its position and the encoded `ServerFrame` its members received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptMessage {
    pub epoch: u64,
    pub seq: u64,
    pub frame: Bytes,
}

/// A page of a room's history.
#[derive(Debug, Clone, Default)]
pub struct HistoryPage {
    /// In the order asked for (oldest first after a position, newest first otherwise).
    pub messages: Vec<KeptMessage>,
    /// More lie beyond the last one.
    pub more: bool,
    /// The room's position.
    pub position: (u64, u64),
    /// The oldest position kept, if any.
    pub oldest: Option<(u64, u64)>,
}

impl HistoryPage {
    /// The page's messages, decoded from the frames members received.
    pub fn into_messages(self) -> Vec<proto::Message> {
        self.messages
            .into_iter()
            .filter_map(|kept| match proto::ServerFrame::decode(kept.frame) {
                Ok(proto::ServerFrame {
                    kind: Some(proto::server_frame::Kind::Message(message)),
                    ..
                }) => Some(message),
                _ => None,
            })
            .collect()
    }
}

/// One remembered pair as a hand-off carries it: how long ago it was recorded, not when (clocks
/// of two nodes cannot be compared; an age can).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub publisher: Arc<str>,
    pub client_msg_id: String,
    pub seq: u64,
    pub age_ms: u64,
}

/// The owner's state of one room.
#[derive(Debug)]
pub struct OwnedRoom {
    sequencer: Sequencer,
    dedupe: Dedupe,
    /// Monotonic milliseconds of the last publish or join.
    last_active_ms: u64,
    /// The recent messages, when the room's class keeps them here.
    window: Option<Window>,
}

impl OwnedRoom {
    /// A room that starts here, in `epoch`.
    pub fn new(epoch: u64, now_ms: u64) -> Self {
        Self {
            sequencer: Sequencer::new(epoch),
            dedupe: Dedupe::default(),
            last_active_ms: now_ms,
            window: None,
        }
    }

    /// The room keeps its recent messages in `window` (see [`Self::keep`]).
    pub fn keeping(mut self, window: Window) -> Self {
        self.window = Some(window);
        self
    }

    /// Keeps message `seq`'s encoded frame, when the room keeps history here.
    pub fn keep(&mut self, seq: u64, frame: &Bytes, now_ms: u64) {
        if let Some(window) = &mut self.window {
            window.keep(seq, frame.clone(), now_ms);
        }
    }

    /// Where a member whose last message was `since` stands (a room that keeps nothing here can
    /// only tell one that missed nothing).
    pub fn recovery(&mut self, since: (u64, u64), now_ms: u64) -> Recovery {
        let (epoch, seq) = self.sequencer.position();
        match &mut self.window {
            Some(window) => window.recovery(since.0, since.1, epoch, seq, now_ms),
            None if since.0 == epoch && since.1 >= seq => Recovery::Recovered {
                from_seq: seq + 1,
                to_seq: seq,
            },
            None => Recovery::Reset {
                epoch,
                oldest_seq: seq,
            },
        }
    }

    /// A page of the kept history (see [`HistoryQuery`]): frames in the order asked for, and
    /// whether more lie beyond.
    pub fn history(&mut self, query: HistoryQuery, limit: usize, now_ms: u64) -> HistoryPage {
        let (epoch, seq) = self.sequencer.position();
        let oldest = self.oldest_kept(now_ms).map(|oldest| (epoch, oldest));
        // One more than asked, to tell whether more lie beyond.
        let mut frames = match query {
            HistoryQuery::Newest => self.kept_before(u64::MAX, limit + 1, now_ms),
            // An older epoch: everything kept is after it; a newer one: nothing is.
            HistoryQuery::After(e, _) if e < epoch => self.kept_after(0, limit + 1, now_ms),
            HistoryQuery::After(e, s) if e == epoch => self.kept_after(s, limit + 1, now_ms),
            HistoryQuery::After(..) => Vec::new(),
            HistoryQuery::Before(e, _) if e > epoch => {
                self.kept_before(u64::MAX, limit + 1, now_ms)
            }
            HistoryQuery::Before(e, s) if e == epoch => self.kept_before(s, limit + 1, now_ms),
            HistoryQuery::Before(..) => Vec::new(),
        };
        let more = frames.len() > limit;
        frames.truncate(limit);
        HistoryPage {
            messages: frames
                .into_iter()
                .map(|(seq, frame)| KeptMessage { epoch, seq, frame })
                .collect(),
            more,
            position: (epoch, seq),
            oldest,
        }
    }

    /// Up to `limit` kept frames after `after_seq`, oldest first.
    pub fn kept_after(&mut self, after_seq: u64, limit: usize, now_ms: u64) -> Vec<(u64, Bytes)> {
        match &mut self.window {
            Some(window) => window.after(after_seq, limit, now_ms),
            None => Vec::new(),
        }
    }

    /// Up to `limit` kept frames before `before_seq`, newest first.
    pub fn kept_before(&mut self, before_seq: u64, limit: usize, now_ms: u64) -> Vec<(u64, Bytes)> {
        match &mut self.window {
            Some(window) => window.before(before_seq, limit, now_ms),
            None => Vec::new(),
        }
    }

    /// The first sequence kept, if any.
    pub fn oldest_kept(&mut self, now_ms: u64) -> Option<u64> {
        self.window.as_mut().and_then(|w| w.oldest(now_ms))
    }

    /// A room handed over by its previous owner at the position it reached, with the pairs it
    /// remembered (oldest first).
    pub fn resume(
        epoch: u64,
        last_seq: u64,
        remembered: impl IntoIterator<Item = Remembered>,
        now_ms: u64,
    ) -> Self {
        let mut dedupe = Dedupe::default();
        for entry in remembered {
            let at = now_ms.saturating_sub(entry.age_ms);
            dedupe.record(
                &entry.publisher,
                &entry.client_msg_id,
                entry.seq,
                at,
                usize::MAX,
            );
        }
        Self {
            sequencer: Sequencer::resume(epoch, last_seq),
            dedupe,
            last_active_ms: now_ms,
            window: None,
        }
    }

    /// The epoch and the last sequence assigned (0 before the first message).
    pub fn position(&self) -> (u64, u64) {
        self.sequencer.position()
    }

    /// A join or another use that keeps the room from being swept.
    pub fn touch(&mut self, now_ms: u64) {
        self.last_active_ms = now_ms;
    }

    /// Unused for at least `ttl_ms`, and keeping no message any more (a room's kept history
    /// lives as long as its age limit allows, members or not).
    pub fn is_idle(&mut self, now_ms: u64, ttl_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_active_ms) >= ttl_ms && self.oldest_kept(now_ms).is_none()
    }

    /// Sequences a publication: a retry of a remembered (publisher, client message id) gets the
    /// original position; otherwise `admit` is asked whether the message may take a position
    /// (the mesh refuses what cannot cross NATS), and the message gets the next one, is
    /// remembered, and its frame is built with `wall_ms` as the server time.
    pub fn sequence<E>(
        &mut self,
        p: &Publication,
        now_ms: u64,
        wall_ms: u64,
        rules: &DedupeRules,
        admit: impl FnOnce() -> Result<(), E>,
    ) -> Result<Sequencing, E> {
        self.last_active_ms = now_ms;
        let dedupe = !p.client_msg_id.is_empty();
        if dedupe
            && let Some(seq) =
                self.dedupe
                    .lookup(&p.publisher, &p.client_msg_id, now_ms, rules.window_ms)
        {
            let epoch = self.sequencer.position().0;
            return Ok(Sequencing::Duplicate { epoch, seq });
        }
        admit()?;
        let (epoch, seq) = self.sequencer.assign();
        if dedupe {
            self.dedupe
                .record(&p.publisher, &p.client_msg_id, seq, now_ms, rules.max);
        }
        let frame = p.frame(epoch, seq, wall_ms);
        Ok(Sequencing::New { epoch, seq, frame })
    }

    /// The remembered pairs, oldest first, with their ages at `now_ms`: what a hand-off carries.
    pub fn remembered(&self, now_ms: u64) -> impl Iterator<Item = Remembered> + '_ {
        self.dedupe
            .entries()
            .map(move |(publisher, id, seq, at)| Remembered {
                publisher: publisher.clone(),
                client_msg_id: id.to_string(),
                seq,
                age_ms: now_ms.saturating_sub(at),
            })
    }
}

/// The owner's per-room ordering state: an epoch and the last sequence number it assigned.
///
/// Pure state, no clock: the caller passes the epoch in when the room comes into being on this
/// owner (see [`EpochClock`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sequencer {
    epoch: u64,
    last_seq: u64,
}

impl Sequencer {
    pub fn new(epoch: u64) -> Self {
        Self { epoch, last_seq: 0 }
    }

    /// Continues a room handed over by its previous owner at the position it reached.
    pub fn resume(epoch: u64, last_seq: u64) -> Self {
        Self { epoch, last_seq }
    }

    /// Assigns the next position; sequence numbers start at 1 and grow by one.
    pub fn assign(&mut self) -> (u64, u64) {
        self.last_seq += 1;
        (self.epoch, self.last_seq)
    }

    /// The current position: the epoch and the last sequence assigned (0 before the first).
    pub fn position(&self) -> (u64, u64) {
        (self.epoch, self.last_seq)
    }
}

/// Hands out epochs that only grow on this node, even across a backwards clock step, and (fed
/// with [`Self::observe`]) that exceed what the other nodes of a mesh may have handed out.
///
/// An epoch is a Unix-millisecond value (so a restarted node's epochs are later than the previous
/// run's), bumped by one when two rooms start within the same millisecond.
#[derive(Debug, Default)]
pub struct EpochClock {
    last: AtomicU64,
}

impl EpochClock {
    /// Raises the clock to at least `floor_ms` (a hybrid logical clock: in a mesh, every node's
    /// clock announced in its heartbeats, so no node hands out an epoch below one another node
    /// may have given, whatever its own wall clock says).
    pub fn observe(&self, floor_ms: u64) {
        self.last.fetch_max(floor_ms, Ordering::Relaxed);
    }

    /// The clock's reading: the last value handed out or observed.
    pub fn reading(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    pub fn next(&self, now_ms: u64) -> u64 {
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let candidate = now_ms.max(prev + 1);
            match self.last.compare_exchange_weak(
                prev,
                candidate,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return candidate,
                Err(actual) => prev = actual,
            }
        }
    }
}

/// The owner's memory of recent (publisher, client message id) pairs, so a retried Publish is
/// acknowledged with its original sequence instead of being delivered twice. Bounded in time
/// (`window_ms`) and count (`max`, oldest forgotten first). Pure: the caller passes the clock.
#[derive(Debug, Default)]
struct Dedupe {
    seen: std::collections::HashMap<(Arc<str>, String), u64>,
    order: std::collections::VecDeque<((Arc<str>, String), u64)>,
}

impl Dedupe {
    /// The sequence this pair was given, if it was seen within the window.
    pub fn lookup(
        &mut self,
        publisher: &Arc<str>,
        client_msg_id: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Option<u64> {
        while let Some(((_, _), at)) = self.order.front() {
            if now_ms.saturating_sub(*at) < window_ms {
                break;
            }
            let (key, _) = self.order.pop_front().expect("front exists");
            self.seen.remove(&key);
        }
        self.seen
            .get(&(publisher.clone(), client_msg_id.to_string()))
            .copied()
    }

    /// The remembered pairs as (publisher, client_msg_id, seq, recorded at), oldest first: what a
    /// graceful hand-off carries to the room's next owner.
    pub fn entries(&self) -> impl Iterator<Item = (&Arc<str>, &str, u64, u64)> {
        self.order.iter().filter_map(|((publisher, id), at)| {
            let seq = *self.seen.get(&(publisher.clone(), id.clone()))?;
            Some((publisher, id.as_str(), seq, *at))
        })
    }

    pub fn record(
        &mut self,
        publisher: &Arc<str>,
        client_msg_id: &str,
        seq: u64,
        now_ms: u64,
        max: usize,
    ) {
        if max == 0 {
            return;
        }
        while self.order.len() >= max {
            let (key, _) = self.order.pop_front().expect("non-empty");
            self.seen.remove(&key);
        }
        let key = (publisher.clone(), client_msg_id.to_string());
        self.seen.insert(key.clone(), seq);
        self.order.push_back((key, now_ms));
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::proto::server_frame;
    use crate::room::RoomName;

    fn publication(id: &str) -> Publication {
        Publication {
            room: RoomName::parse_client("lobby", 128).unwrap(),
            payload: Bytes::from_static(b"hi"),
            publisher: "alice".into(),
            client_msg_id: id.into(),
            trace: Default::default(),
        }
    }

    const RULES: DedupeRules = DedupeRules {
        window_ms: 1_000,
        max: 100,
    };

    fn ok() -> Result<(), ()> {
        Ok(())
    }

    #[test]
    fn a_room_numbers_new_messages_and_answers_retries_with_the_original_position() {
        let mut room = OwnedRoom::new(7, 0);
        let Ok(Sequencing::New { epoch, seq, frame }) =
            room.sequence(&publication("m1"), 10, 5_000, &RULES, ok)
        else {
            panic!("a new message");
        };
        assert_eq!((epoch, seq), (7, 1));
        let Some(server_frame::Kind::Message(message)) = frame.kind else {
            panic!("a Message frame");
        };
        assert_eq!((message.seq, message.server_time_ms), (1, 5_000));
        assert_eq!(
            room.sequence(&publication("m1"), 20, 5_010, &RULES, ok),
            Ok(Sequencing::Duplicate { epoch: 7, seq: 1 })
        );
        assert!(matches!(
            room.sequence(&publication(""), 30, 5_020, &RULES, ok),
            Ok(Sequencing::New { seq: 2, .. })
        ));
        assert!(
            matches!(
                room.sequence(&publication(""), 40, 5_030, &RULES, ok),
                Ok(Sequencing::New { seq: 3, .. }),
            ),
            "messages without an id are never duplicates"
        );
        // Past the window the id may be used again.
        assert!(matches!(
            room.sequence(&publication("m1"), 1_100, 6_100, &RULES, ok),
            Ok(Sequencing::New { seq: 4, .. })
        ));
        assert_eq!(room.position(), (7, 4));
    }

    #[test]
    fn a_refused_message_takes_no_position() {
        let mut room = OwnedRoom::new(1, 0);
        assert_eq!(
            room.sequence(&publication("big"), 0, 0, &RULES, || Err("too large")),
            Err("too large")
        );
        assert_eq!(room.position(), (1, 0));
        assert!(
            matches!(
                room.sequence(&publication("big"), 0, 0, &RULES, ok),
                Ok(Sequencing::New { seq: 1, .. })
            ),
            "a refused id was not remembered"
        );
    }

    #[test]
    fn a_handed_over_room_keeps_its_position_and_remembered_ids_by_age() {
        let mut old = OwnedRoom::new(3, 1_000);
        old.sequence(&publication("a"), 1_000, 0, &RULES, ok)
            .unwrap();
        old.sequence(&publication("b"), 1_600, 0, &RULES, ok)
            .unwrap();
        let carried: Vec<Remembered> = old.remembered(1_700).collect();
        assert_eq!(carried[0].age_ms, 700);
        // The new owner's monotonic clock reads something else entirely.
        let mut new = OwnedRoom::resume(3, 2, carried, 50_000);
        assert_eq!(new.position(), (3, 2));
        assert_eq!(
            new.sequence(&publication("b"), 50_100, 0, &RULES, ok),
            Ok(Sequencing::Duplicate { epoch: 3, seq: 2 })
        );
        // "a" was 700 ms old at the hand-off: 400 ms later it is past the 1 s window.
        assert!(matches!(
            new.sequence(&publication("a"), 50_400, 0, &RULES, ok),
            Ok(Sequencing::New { seq: 3, .. })
        ));
    }

    #[test]
    fn idleness_is_measured_from_the_last_use() {
        let mut room = OwnedRoom::new(1, 0);
        assert!(!room.is_idle(999, 1_000));
        assert!(room.is_idle(1_000, 1_000));
        room.touch(1_000);
        assert!(!room.is_idle(1_999, 1_000));
    }

    #[test]
    fn sequencer_counts_from_one_within_its_epoch() {
        let mut s = Sequencer::new(9);
        assert_eq!(s.position(), (9, 0));
        assert_eq!(s.assign(), (9, 1));
        assert_eq!(s.assign(), (9, 2));
        assert_eq!(s.position(), (9, 2));
    }

    #[test]
    fn an_observed_clock_ahead_of_the_wall_clock_raises_the_next_epoch() {
        let clock = EpochClock::default();
        clock.observe(10_000);
        assert_eq!(clock.next(100), 10_001, "a node 10 s behind its peers");
        clock.observe(5_000);
        assert_eq!(clock.next(100), 10_002, "a lower reading changes nothing");
        assert_eq!(clock.reading(), 10_002);
    }

    #[test]
    fn epochs_only_grow() {
        let clock = EpochClock::default();
        assert_eq!(clock.next(100), 100);
        assert_eq!(clock.next(100), 101);
        assert_eq!(clock.next(50), 102);
        assert_eq!(clock.next(500), 500);
    }

    #[test]
    fn dedupe_remembers_pairs_within_its_window_and_bound() {
        let mut d = Dedupe::default();
        let alice: Arc<str> = "alice".into();
        let bob: Arc<str> = "bob".into();
        d.record(&alice, "m1", 7, 1_000, 2);
        assert_eq!(d.lookup(&alice, "m1", 1_500, 1_000), Some(7));
        assert_eq!(
            d.lookup(&bob, "m1", 1_500, 1_000),
            None,
            "ids are per publisher"
        );
        assert_eq!(
            d.lookup(&alice, "m1", 2_000, 1_000),
            None,
            "forgotten after the window"
        );
        d.record(&alice, "a", 1, 3_000, 2);
        d.record(&alice, "b", 2, 3_000, 2);
        d.record(&alice, "c", 3, 3_000, 2);
        assert_eq!(
            d.lookup(&alice, "a", 3_000, 1_000),
            None,
            "oldest forgotten at the bound"
        );
        assert_eq!(d.lookup(&alice, "c", 3_000, 1_000), Some(3));
    }
}
