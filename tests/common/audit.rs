//! What members received, checked against what publishers were told: the delivery contract of
//! a room under failures, as one report with counts and the first offenders.
//!
//! For each room, with the members' events (in arrival order) and every publish's attempts:
//! - **lost**: a member that must see everything (its node never cut off) lacks an
//!   acknowledged publish first sent after its join was answered (by time, not by position:
//!   an epoch that goes backwards must not excuse a loss);
//! - **duplicates**: a payload a member received more than once. One kind is allowed, the one
//!   docs/CLUSTER.md describes for an owner that dies: the old owner published the message, the
//!   acknowledgement was lost, the retry was sequenced again by the new owner: exactly twice, in
//!   two epochs, acknowledged in the later one, and the publisher's last message in the earlier
//!   one (one publish in flight per publisher). Any other is a violation;
//! - **epoch regressions**: a member got a Message or an EpochChanged of an older epoch after a
//!   newer one; **order**: a position not after the previous one (or not after `Joined`);
//! - **conflicts**: two members hold different payloads at one (epoch, seq), or a member holds
//!   another payload at an acknowledged position (two sequencers);
//! - **ack regressions**: one publisher's acknowledged positions did not grow;
//! - and, as availability: publishes given up (never acknowledged) and publishers that stopped
//!   on an error.
//!
//! - **diverged**: two members that must see everything hold different lists of messages
//!   (compared after the later of their joins): one NATS publish reaches every node or none, so
//!   a message only some members got was delivered by one node alone.
//!
//! With no order violation and no conflict, all members of a room saw the messages they have in
//! common in one order.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use roomwire::client::Event;

use super::mesh::Member;
use super::node_process::NodeProcess;
use super::traffic::Publish;

/// The counter the fenced-ownership fix adds: messages of an older epoch that reached a node
/// after it had delivered a newer epoch of the room.
pub const STALE_EPOCH_METRIC: &str = "roomwire_mesh_stale_epoch_messages_total";
/// Today's counter of messages a node dropped as older than what it delivered.
pub const STALE_METRIC: &str = "roomwire_mesh_stale_messages_total";

/// A member and whether it must receive every acknowledged publish after its join.
pub struct Watched<'a> {
    pub member: &'a Member,
    pub complete: bool,
}

impl<'a> Watched<'a> {
    pub fn all(member: &'a Member) -> Self {
        Watched {
            member,
            complete: true,
        }
    }

    /// A member on a node that was cut off: it may miss what was published meanwhile (as
    /// documented), so only order, epochs and conflicts are checked.
    pub fn partial(member: &'a Member) -> Self {
        Watched {
            member,
            complete: false,
        }
    }
}

/// Offenders kept per kind, for the report.
const SHOW: usize = 6;

#[derive(Debug, Default, Clone)]
pub struct Kind {
    pub count: usize,
    pub first: Vec<String>,
}

impl Kind {
    fn add(&mut self, what: impl FnOnce() -> String) {
        self.count += 1;
        if self.first.len() < SHOW {
            self.first.push(what());
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct RoomReport {
    pub acked: usize,
    /// Distinct epochs any member saw (messages and EpochChanged), in order.
    pub epochs: Vec<u64>,
    pub expected: usize,
    pub delivered: usize,
}

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub scenario: String,
    pub publishes: usize,
    pub acked: usize,
    pub refused_attempts: usize,
    pub timed_out_attempts: usize,
    pub gave_up: Kind,
    pub failed: Kind,
    /// (member, acknowledged publish) pairs that had to arrive, and did.
    pub expected: usize,
    pub delivered: usize,
    pub lost: Kind,
    pub allowed_duplicates: Kind,
    pub duplicates: Kind,
    pub epoch_regressions: Kind,
    pub order: Kind,
    pub conflicts: Kind,
    pub ack_regressions: Kind,
    pub diverged: Kind,
    /// (room, id) of every acknowledged publish some member lacks.
    pub lost_ids: BTreeSet<(String, String)>,
    /// Payloads members received that no publisher was told were acknowledged.
    pub unacked_received: usize,
    pub rooms: BTreeMap<String, RoomReport>,
}

/// One member's view of its room: messages (epoch, seq, payload) and epoch changes, in order.
enum Seen {
    Message(u64, u64, String),
    EpochChanged(u64),
}

fn seen_in_room(member: &Member) -> Vec<Seen> {
    let room = &member.joined.room;
    member
        .events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if &m.room == room => Some(Seen::Message(
                m.epoch,
                m.seq,
                String::from_utf8_lossy(&m.payload).into_owned(),
            )),
            Event::EpochChanged(c) if &c.room == room => Some(Seen::EpochChanged(c.epoch)),
            _ => None,
        })
        .collect()
}

/// Whether every member that must see everything has every acknowledged publish of its room
/// (after its join): the condition to wait for before [`audit`].
pub fn all_delivered(members: &[Watched<'_>], publishes: &[Publish]) -> bool {
    members.iter().filter(|w| w.complete).all(|w| {
        let got: BTreeSet<String> = seen_in_room(w.member)
            .into_iter()
            .filter_map(|s| match s {
                Seen::Message(_, _, p) => Some(p),
                Seen::EpochChanged(_) => None,
            })
            .collect();
        publishes
            .iter()
            .filter(|p| p.room == w.member.joined.room && p.position().is_some())
            .filter(|p| p.first_sent() > w.member.joined_at)
            .all(|p| got.contains(&p.id))
    })
}

/// Waits (polling) until [`all_delivered`] holds or `within` passes; true when it holds. Not
/// an assertion: a test prints the [`audit`] either way, then asserts on it.
pub async fn wait_delivered(
    members: &[Watched<'_>],
    publishes: &[Publish],
    within: std::time::Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if all_delivered(members, publishes) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Checks the members' events against the publishes; see the module documentation.
pub fn audit(scenario: &str, members: &[Watched<'_>], publishes: &[Publish]) -> Report {
    let mut r = Report {
        scenario: scenario.into(),
        publishes: publishes.len(),
        ..Report::default()
    };
    let acked: HashMap<(&str, &str), &Publish> = publishes
        .iter()
        .filter(|p| p.position().is_some())
        .map(|p| ((p.room.as_str(), p.id.as_str()), p))
        .collect();
    for p in publishes {
        r.refused_attempts += p.refusals();
        r.timed_out_attempts += p.timeouts();
        let room = r.rooms.entry(p.room.clone()).or_default();
        if p.position().is_some() {
            r.acked += 1;
            room.acked += 1;
        } else if let Some(why) = p.failure() {
            r.failed.add(|| format!("{}: {why}", p.id));
        } else {
            // Not acknowledged within the publisher's bound.
            r.gave_up
                .add(|| format!("{} after {} attempts", p.id, p.attempts.len()));
        }
    }

    // One publisher's acknowledgements only move forward.
    let mut by_publisher: BTreeMap<(&str, &str), Vec<&Publish>> = BTreeMap::new();
    for p in publishes.iter().filter(|p| p.position().is_some()) {
        by_publisher
            .entry((p.publisher.as_str(), p.room.as_str()))
            .or_default()
            .push(p);
    }
    for list in by_publisher.values() {
        for w in list.windows(2) {
            let (a, b) = (w[0].position().unwrap(), w[1].position().unwrap());
            if b <= a {
                r.ack_regressions.add(|| {
                    format!(
                        "{} acked at {}:{} after {} at {}:{}",
                        w[1].id, b.0, b.1, w[0].id, a.0, a.1
                    )
                });
            }
        }
    }

    // Who holds what at each position, per room.
    let mut at: HashMap<(String, u64, u64), (String, String)> = HashMap::new();
    let mut epochs: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for w in members {
        let m = w.member;
        let room = m.joined.room.clone();
        let joined = (m.joined.epoch, m.joined.seq);
        let seen = seen_in_room(m);
        let mut last = joined;
        let mut max_epoch = joined.0;
        let mut copies: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        for s in &seen {
            match s {
                Seen::EpochChanged(e) => {
                    epochs.entry(room.clone()).or_default().insert(*e);
                    if *e < max_epoch {
                        r.epoch_regressions.add(|| {
                            format!("{}: EpochChanged to {e} after epoch {max_epoch}", m.label)
                        });
                    }
                    max_epoch = max_epoch.max(*e);
                }
                Seen::Message(e, q, p) => {
                    epochs.entry(room.clone()).or_default().insert(*e);
                    if *e < max_epoch {
                        r.epoch_regressions
                            .add(|| format!("{}: {p} at {e}:{q} after epoch {max_epoch}", m.label));
                    } else if (*e, *q) <= last {
                        r.order.add(|| {
                            format!("{}: {p} at {e}:{q} after {}:{}", m.label, last.0, last.1)
                        });
                    }
                    max_epoch = max_epoch.max(*e);
                    last = last.max((*e, *q));
                    copies.entry(p.as_str()).or_default().push((*e, *q));
                    match at.get(&(room.clone(), *e, *q)) {
                        Some((who, other)) if other != p => r.conflicts.add(|| {
                            format!("{room} {e}:{q}: {p} at {}, {other} at {who}", m.label)
                        }),
                        Some(_) => {}
                        None => {
                            at.insert((room.clone(), *e, *q), (m.label.clone(), p.clone()));
                        }
                    }
                    if !acked.contains_key(&(room.as_str(), p.as_str())) {
                        r.unacked_received += 1;
                    }
                }
            }
        }
        // Received, but not at the acknowledged position. A member of a cut-off node that
        // missed the acknowledged position (it was cut off then) may hold only the earlier copy
        // of the documented in-flight duplicate: not a conflict by itself.
        let mut first_seen: BTreeMap<u64, u64> = BTreeMap::new();
        for s in &seen {
            if let Seen::Message(e, q, _) = s {
                let first = first_seen.entry(*e).or_insert(*q);
                *first = (*first).min(*q);
            }
        }
        let missed = |pos: (u64, u64)| first_seen.get(&pos.0).is_none_or(|first| *first > pos.1);
        for (p, positions) in &copies {
            if let Some(pos) = acked
                .get(&(room.as_str(), *p))
                .and_then(|publish| publish.position())
                && !positions.contains(&pos)
                && (w.complete || !missed(pos))
            {
                r.conflicts.add(|| {
                    format!(
                        "{}: {p} at {positions:?}, acknowledged at {}:{}",
                        m.label, pos.0, pos.1
                    )
                });
            }
        }
        // Duplicates.
        for (p, positions) in &copies {
            if positions.len() < 2 {
                continue;
            }
            let allowed = positions.len() == 2
                && positions[0].0 < positions[1].0
                && acked
                    .get(&(room.as_str(), *p))
                    .is_some_and(|publish| publish.position().unwrap().0 == positions[1].0)
                && {
                    // The publisher's last message in the earlier epoch, here.
                    let publisher = p.rsplit_once('#').map_or(*p, |(l, _)| l);
                    let last_old = seen.iter().rev().find_map(|s| match s {
                        Seen::Message(e, _, q)
                            if *e == positions[0].0
                                && q.rsplit_once('#').is_some_and(|(l, _)| l == publisher) =>
                        {
                            Some(q.as_str())
                        }
                        _ => None,
                    });
                    last_old == Some(*p)
                };
            let what = || format!("{}: {p} at {positions:?}", m.label);
            if allowed {
                r.allowed_duplicates.add(what);
            } else {
                r.duplicates.add(what);
            }
        }
        // Completeness.
        if w.complete {
            let room_report = r.rooms.entry(room.clone()).or_default();
            for publish in publishes.iter().filter(|p| p.room == room) {
                let Some(pos) = publish.position() else {
                    continue;
                };
                if publish.first_sent() <= m.joined_at {
                    continue;
                }
                r.expected += 1;
                room_report.expected += 1;
                if copies.contains_key(publish.id.as_str()) {
                    r.delivered += 1;
                    room_report.delivered += 1;
                } else {
                    r.lost_ids.insert((room.clone(), publish.id.clone()));
                    r.lost.add(|| {
                        format!(
                            "{}: {} (acknowledged at {}:{} by {})",
                            m.label,
                            publish.id,
                            pos.0,
                            pos.1,
                            publish.acked().unwrap().1.node
                        )
                    });
                }
            }
        }
    }
    // Members that must see everything see the same list.
    let mut reference: HashMap<&str, &Watched<'_>> = HashMap::new();
    for w in members.iter().filter(|w| w.complete) {
        let room = w.member.joined.room.as_str();
        let Some(first) = reference.get(room) else {
            reference.insert(room, w);
            continue;
        };
        let position = |m: &Member| (m.joined.epoch, m.joined.seq);
        let cut = position(first.member).max(position(w.member));
        let after = |m: &Member| -> Vec<(u64, u64, String)> {
            seen_in_room(m)
                .into_iter()
                .filter_map(|s| match s {
                    Seen::Message(e, q, p) if (e, q) > cut => Some((e, q, p)),
                    _ => None,
                })
                .collect()
        };
        let (a, b) = (after(first.member), after(w.member));
        if a != b {
            let i = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            r.diverged.add(|| {
                format!(
                    "{} and {} differ at message {i} after {}:{}: {:?} vs {:?} ({} and {} \
                     messages)",
                    first.member.label,
                    w.member.label,
                    cut.0,
                    cut.1,
                    a.get(i),
                    b.get(i),
                    a.len(),
                    b.len()
                )
            });
        }
    }
    // A member holding another payload at an acknowledged position.
    for p in acked.values() {
        let (e, q) = p.position().unwrap();
        if let Some((who, other)) = at.get(&(p.room.clone(), e, q))
            && other != &p.id
        {
            r.conflicts.add(|| {
                format!(
                    "{} {e}:{q}: acknowledged for {}, {who} holds {other}",
                    p.room, p.id
                )
            });
        }
    }
    for (room, set) in epochs {
        r.rooms.entry(room).or_default().epochs = set.into_iter().collect();
    }
    r
}

impl Report {
    /// The violations of the delivery contract, one line per kind (empty: none).
    pub fn violations(&self) -> Vec<String> {
        [
            ("acknowledged publishes lost", &self.lost),
            ("duplicates", &self.duplicates),
            ("older epoch after a newer one", &self.epoch_regressions),
            ("out of order", &self.order),
            ("conflicting positions", &self.conflicts),
            (
                "acknowledged positions went backwards",
                &self.ack_regressions,
            ),
            ("members' messages differ", &self.diverged),
        ]
        .into_iter()
        .filter(|(_, k)| k.count > 0)
        .map(|(what, k)| format!("{what}: {} (first: {:?})", k.count, k.first))
        .collect()
    }

    /// Publishes never acknowledged, and publishers stopped by an error.
    pub fn unavailability(&self) -> Vec<String> {
        [("given up", &self.gave_up), ("failed", &self.failed)]
            .into_iter()
            .filter(|(_, k)| k.count > 0)
            .map(|(what, k)| format!("{what}: {} (first: {:?})", k.count, k.first))
            .collect()
    }

    /// Prints the summary line (`FENCING <scenario> ...`), one line per room, and the
    /// offenders of each kind.
    pub fn print(&self) {
        eprintln!(
            "FENCING {} acked={} of {} publishes (attempts refused={} timed_out={} gave_up={} \
             failed={}) delivered={}/{} lost={} duplicates={} (allowed in-flight re-sequenced={}) \
             epoch_regressions={} order={} conflicts={} ack_regressions={} diverged={} \
             unacked_received={}",
            self.scenario,
            self.acked,
            self.publishes,
            self.refused_attempts,
            self.timed_out_attempts,
            self.gave_up.count,
            self.failed.count,
            self.delivered,
            self.expected,
            self.lost.count,
            self.duplicates.count,
            self.allowed_duplicates.count,
            self.epoch_regressions.count,
            self.order.count,
            self.conflicts.count,
            self.ack_regressions.count,
            self.diverged.count,
            self.unacked_received,
        );
        for (room, rr) in &self.rooms {
            eprintln!(
                "  {room}: acked={} delivered={}/{} epochs seen={} {:?}",
                rr.acked,
                rr.delivered,
                rr.expected,
                rr.epochs.len(),
                rr.epochs
            );
        }
        for line in self.violations().iter().chain(&self.unavailability()) {
            eprintln!("  ! {line}");
        }
        if self.allowed_duplicates.count > 0 {
            eprintln!("  allowed duplicates: {:?}", self.allowed_duplicates.first);
        }
    }
}

/// One node's mesh counters after a run.
#[derive(Debug, Clone)]
pub struct Counters {
    pub node: String,
    /// [`STALE_EPOCH_METRIC`]; `None` when this build does not export it.
    pub stale_epoch: Option<f64>,
    pub stale: Option<f64>,
    pub gaps: Option<f64>,
    pub epochs_started: Option<f64>,
}

/// Reads and prints each node's [`Counters`]; the caller asserts.
pub async fn mesh_counters(nodes: &[&NodeProcess]) -> Vec<Counters> {
    let mut out = Vec::new();
    for node in nodes {
        let c = Counters {
            node: node.id.clone(),
            stale_epoch: node.try_metric(STALE_EPOCH_METRIC).await,
            stale: node.try_metric(STALE_METRIC).await,
            gaps: node.try_metric("roomwire_mesh_gaps_total").await,
            epochs_started: node.try_metric("roomwire_mesh_epochs_started_total").await,
        };
        let show = |v: Option<f64>| v.map_or("absent".to_string(), |v| v.to_string());
        eprintln!(
            "  {}: {STALE_EPOCH_METRIC}={} {STALE_METRIC}={} roomwire_mesh_gaps_total={} \
             roomwire_mesh_epochs_started_total={}",
            c.node,
            show(c.stale_epoch),
            show(c.stale),
            show(c.gaps),
            show(c.epochs_started),
        );
        out.push(c);
    }
    out
}

/// Asserts [`STALE_EPOCH_METRIC`] is at most `allowed` on every node that exports it (0 but where
/// a scenario leaves unacknowledged messages in a cut-off node's socket).
pub fn assert_stale_epochs_at_most(counters: &[Counters], allowed: usize) {
    for c in counters {
        if let Some(v) = c.stale_epoch {
            assert!(
                v <= allowed as f64,
                "{}: {STALE_EPOCH_METRIC} = {v} (allowed {allowed}): older-epoch messages arrived \
                 after newer ones",
                c.node
            );
        }
    }
}
