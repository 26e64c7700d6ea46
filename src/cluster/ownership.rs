//! Who may sequence a room: the mesh's ownership decisions, as pure functions and a small state
//! machine (no IO, no clock; in the style of [`super::order`]). The mesh gathers the facts (its
//! view of the ring, its NATS connection, what it delivered) and carries out the decision.
//!
//! The rules, each tested below:
//! - **Using held state** ([`may_use`]): only the state of the current connection, not released,
//!   not older than an epoch this node has already seen delivered, and only while this node is
//!   the room's owner in its own view.
//! - **Release** ([`on_release`]): a holder gives a room up only when it agrees that it is not
//!   the owner; it never hands on stale state.
//! - **Hand-off** ([`may_take_handoff`]): a pushed room is installed only by a node that holds
//!   its lease, is not draining, has no state of its own for the room, has room in its table,
//!   and has not seen a newer epoch of the room.
//! - **Take-over** ([`Pull`]): the new owner asks the nodes that may hold the room, following
//!   "moved to" pointers, and starts a new epoch only when every node asked holds nothing.
//! - **New epochs** ([`fresh_epoch`]): above every epoch this node gave or delivered for the room.

use std::sync::Arc;

use crate::cluster::owners::Held;
use crate::cluster::ring::Ring;
use crate::room::EpochClock;

/// Nodes asked for a room's state at most when no pointer leads on: the ring's successors.
pub const PULL_HOPS: usize = 3;

/// What this node knows right now, when it is about to use or give up a room's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// This node is the room's owner in its own view (settled, not draining).
    pub owns: bool,
    /// The current NATS connection (see [`Held::generation`]).
    pub generation: u64,
    /// The newest epoch of the room this node has delivered to its members, if any.
    pub known_epoch: Option<u64>,
}

/// Whether held state may be used to sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Sequence,
    /// Released to another node meanwhile: re-route.
    Moved,
    /// Stale (from an earlier connection, or a newer epoch exists): drop it and re-route; the
    /// next use takes the room over afresh.
    Forget,
    /// This node is not the owner in its view (the ring changed): re-route.
    NotOwner,
}

/// Decides whether `held` may sequence now.
pub fn may_use(held: &Held, now: &Facts) -> Use {
    if held.moved {
        return Use::Moved;
    }
    if is_stale(held, now) {
        return Use::Forget;
    }
    if !now.owns {
        return Use::NotOwner;
    }
    Use::Sequence
}

/// State from before the current connection, or behind an epoch already delivered here: another
/// node may have sequenced the room since, so it must never be used or handed on.
fn is_stale(held: &Held, now: &Facts) -> bool {
    held.generation != now.generation
        || now
            .known_epoch
            .is_some_and(|known| known > held.room.position().0)
}

/// What a holder does with a request to release a room to another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Nothing held here (or it was given away): say where it went, if known.
    NotHere,
    /// Held state is stale: drop it, and answer as if nothing were held.
    ForgetStale,
    /// This node still owns the room in its view: refuse, the asker tries again once the views
    /// agree (two nodes never sequence at once).
    Refuse,
    /// Mark it moved, flush what was published, and hand the state over.
    Give,
}

/// Decides a release request for `held` (`None`: no state for the room here).
pub fn on_release(held: Option<&Held>, now: &Facts) -> Release {
    match held {
        None => Release::NotHere,
        Some(held) if held.moved => Release::NotHere,
        Some(held) if is_stale(held, now) => Release::ForgetStale,
        Some(_) if now.owns => Release::Refuse,
        Some(_) => Release::Give,
    }
}

/// What a node knows when a draining node pushes it a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoffFacts {
    pub draining: bool,
    /// It holds its ownership lease. (It need not have settled: the pusher's settled view made
    /// it the owner, so a newcomer takes rooms handed to it before it has learnt the mesh.)
    pub lease: bool,
    /// This node already holds state for the room.
    pub holds: bool,
    /// This node's table of owned rooms is full.
    pub full: bool,
    /// The newest epoch of the room this node has delivered.
    pub known_epoch: Option<u64>,
}

/// Whether a pushed room state at `epoch` may be installed.
pub fn may_take_handoff(epoch: u64, facts: &HandoffFacts) -> bool {
    !facts.draining
        && facts.lease
        && !facts.holds
        && !facts.full
        && facts.known_epoch.is_none_or(|known| known <= epoch)
}

/// A holder's answer to a release request, as the puller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullReply<S> {
    /// The room's state: the pull is over.
    State(S),
    /// Given to this node; ask it next.
    MovedTo(String),
    /// Holds nothing.
    Nothing,
    /// Holds the room and does not agree it is not the owner (yet), or cannot give it now.
    Busy(String),
    /// Nobody subscribes to its subject: it is gone.
    Gone,
    /// Did not answer in time: alive by its heartbeats, it may hold the room.
    Silent(String),
}

/// How a pull ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pulled<S> {
    State(S),
    /// No node holds the room: start a new epoch.
    Nowhere,
    /// A node may hold it but cannot give it now: try again later.
    Busy(String),
}

/// The search for a room's previous holder: the room's owner on the ring of holders without
/// this node, then the next ones (at most [`PULL_HOPS`]), or where a holder says it went.
#[derive(Debug)]
pub struct Pull {
    asked: Vec<Arc<str>>,
    next: Option<Arc<str>>,
    rounds: usize,
}

impl Pull {
    pub fn new(self_id: Arc<str>) -> Self {
        Self {
            asked: vec![self_id],
            next: None,
            rounds: 0,
        }
    }

    /// The next node to ask, or `None` when the search is over (then: nowhere).
    pub fn next_candidate(&mut self, room: &str, holders: &Ring) -> Option<Arc<str>> {
        if self.rounds >= PULL_HOPS * 2 {
            return None;
        }
        if self.next.is_none() && self.asked.len() > PULL_HOPS {
            return None;
        }
        self.rounds += 1;
        match self.next.take() {
            Some(node) => Some(node),
            None => holders
                .owner_excluding(room, |n| self.asked.iter().any(|a| **a == *n))
                .cloned(),
        }
    }

    /// Takes `candidate`'s reply; `Some` ends the pull.
    pub fn answer<S>(&mut self, candidate: Arc<str>, reply: PullReply<S>) -> Option<Pulled<S>> {
        match reply {
            PullReply::State(state) => return Some(Pulled::State(state)),
            PullReply::Busy(reason) => return Some(Pulled::Busy(reason)),
            PullReply::Silent(reason) => {
                return Some(Pulled::Busy(format!(
                    "{candidate} did not answer: {reason}"
                )));
            }
            PullReply::MovedTo(node) => {
                if !self.asked.iter().any(|a| **a == *node) {
                    self.next = Some(Arc::from(node.as_str()));
                }
            }
            PullReply::Nothing | PullReply::Gone => {}
        }
        self.asked.push(candidate);
        None
    }
}

/// A new epoch for a room: a millisecond value from `clock` (never below `wall_ms`, and above
/// every epoch this node gave), above `known` (the newest epoch of the room delivered here, so a
/// new owner whose clock runs behind the previous owner's still moves the room forward), times
/// 1024, with the node's hash in the low bits so two nodes starting a room in the same
/// millisecond still differ.
pub fn fresh_epoch(clock: &EpochClock, wall_ms: u64, known: u64, node_hash: u64) -> u64 {
    let ms = clock.next(wall_ms.max(known / 1024 + 1));
    ms * 1024 + (node_hash & 1023)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::OwnedRoom;

    fn held(epoch: u64, generation: u64) -> Held {
        Held::new(OwnedRoom::new(epoch, 0), generation)
    }

    fn facts(owns: bool, generation: u64, known_epoch: Option<u64>) -> Facts {
        Facts {
            owns,
            generation,
            known_epoch,
        }
    }

    #[test]
    fn held_state_is_used_only_on_its_connection_by_the_owner() {
        let state = held(100, 2);
        assert_eq!(may_use(&state, &facts(true, 2, None)), Use::Sequence);
        assert_eq!(may_use(&state, &facts(true, 2, Some(100))), Use::Sequence);
        assert_eq!(may_use(&state, &facts(false, 2, None)), Use::NotOwner);
        assert_eq!(
            may_use(&state, &facts(true, 3, None)),
            Use::Forget,
            "from before a reconnect"
        );
        let mut moved = held(100, 2);
        moved.moved = true;
        assert_eq!(may_use(&moved, &facts(true, 2, None)), Use::Moved);
    }

    #[test]
    fn a_newer_epoch_delivered_here_makes_held_state_stale() {
        // Another node took the room over in epoch 200 while this one held epoch 100 (it was
        // stalled, or cut off): this node must never sequence in 100 again.
        let state = held(100, 2);
        assert_eq!(may_use(&state, &facts(true, 2, Some(200))), Use::Forget);
        assert_eq!(
            on_release(Some(&state), &facts(false, 2, Some(200))),
            Release::ForgetStale
        );
    }

    #[test]
    fn a_holder_releases_only_when_it_agrees_it_is_not_the_owner() {
        let state = held(100, 1);
        assert_eq!(on_release(None, &facts(false, 1, None)), Release::NotHere);
        assert_eq!(
            on_release(Some(&state), &facts(true, 1, None)),
            Release::Refuse
        );
        assert_eq!(
            on_release(Some(&state), &facts(false, 1, None)),
            Release::Give
        );
        assert_eq!(
            on_release(Some(&state), &facts(false, 2, None)),
            Release::ForgetStale,
            "never hands on state from before a reconnect"
        );
        let mut moved = held(100, 1);
        moved.moved = true;
        assert_eq!(
            on_release(Some(&moved), &facts(false, 1, None)),
            Release::NotHere
        );
    }

    #[test]
    fn a_handoff_is_taken_only_by_a_leased_node_without_newer_state() {
        let ok = HandoffFacts {
            draining: false,
            lease: true,
            holds: false,
            full: false,
            known_epoch: Some(100),
        };
        assert!(may_take_handoff(100, &ok));
        assert!(may_take_handoff(
            100,
            &HandoffFacts {
                known_epoch: None,
                ..ok
            }
        ));
        for refused in [
            HandoffFacts {
                draining: true,
                ..ok
            },
            HandoffFacts { lease: false, ..ok },
            HandoffFacts { holds: true, ..ok },
            HandoffFacts { full: true, ..ok },
        ] {
            assert!(!may_take_handoff(100, &refused), "{refused:?}");
        }
        assert!(
            !may_take_handoff(99, &ok),
            "a pushed state older than an epoch delivered here is stale"
        );
    }

    fn ring(nodes: &[&str]) -> Ring {
        Ring::new(nodes.iter().copied(), 64)
    }

    #[test]
    fn a_pull_asks_the_ring_successors_and_ends_nowhere_when_nobody_holds_the_room() {
        let holders = ring(&["a", "b", "c", "d", "e"]);
        let mut pull = Pull::new("a".into());
        let mut asked = Vec::new();
        while let Some(candidate) = pull.next_candidate("chat.x", &holders) {
            asked.push(candidate.to_string());
            assert_eq!(pull.answer::<()>(candidate, PullReply::Nothing), None);
        }
        assert_eq!(asked.len(), PULL_HOPS, "{asked:?}");
        assert!(!asked.contains(&"a".to_string()), "never asks itself");
        let mut unique = asked.clone();
        unique.dedup();
        assert_eq!(unique.len(), asked.len());
    }

    #[test]
    fn a_pull_follows_moved_to_pointers_and_stops_at_state_or_busy() {
        let holders = ring(&["a", "b", "c"]);
        let mut pull = Pull::new("a".into());
        let first = pull.next_candidate("room", &holders).unwrap();
        assert_eq!(
            pull.answer(first.clone(), PullReply::<u32>::MovedTo("z".into())),
            None
        );
        let second = pull.next_candidate("room", &holders).unwrap();
        assert_eq!(&*second, "z", "the pointer is followed before the ring");
        assert_eq!(
            pull.answer(second, PullReply::State(7)),
            Some(Pulled::State(7))
        );

        let mut pull = Pull::new("a".into());
        let candidate = pull.next_candidate("room", &holders).unwrap();
        let name = candidate.to_string();
        assert_eq!(
            pull.answer::<u32>(candidate, PullReply::Silent("timed out".into())),
            Some(Pulled::Busy(format!("{name} did not answer: timed out")))
        );
        let mut pull = Pull::new("a".into());
        let candidate = pull.next_candidate("room", &holders).unwrap();
        assert_eq!(
            pull.answer::<u32>(candidate, PullReply::Busy("still the owner".into())),
            Some(Pulled::Busy("still the owner".into()))
        );
    }

    #[test]
    fn a_pull_never_asks_a_node_twice_even_when_pointers_loop() {
        let holders = ring(&["a", "b"]);
        let mut pull = Pull::new("a".into());
        let b = pull.next_candidate("room", &holders).unwrap();
        assert_eq!(&*b, "b");
        // b says it gave the room to a (this node) — already asked: not followed.
        assert_eq!(pull.answer::<()>(b, PullReply::MovedTo("a".into())), None);
        assert_eq!(pull.next_candidate("room", &holders), None);
    }

    #[test]
    fn fresh_epochs_grow_past_what_was_delivered_and_carry_the_node() {
        let clock = EpochClock::default();
        let e1 = fresh_epoch(&clock, 1_000, 0, 5);
        assert_eq!(e1, 1_000 * 1024 + 5);
        // The clock went back; the epoch still grows.
        let e2 = fresh_epoch(&clock, 900, 0, 5);
        assert!(e2 > e1);
        // Another node delivered an epoch from a clock far ahead: the new one is above it.
        let known = 5_000 * 1024 + 77;
        let e3 = fresh_epoch(&clock, 1_100, known, 5);
        assert!(e3 > known);
        assert_eq!(e3 & 1023, 5);
    }
}
